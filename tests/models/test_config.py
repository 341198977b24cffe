import jax
import pytest
from flax import nnx

from tnjax.models import GPT, GPTConfig, LayerSpec, preset


def test_json_round_trip_and_specs():
  cfg = preset("tiny", layers={"mlp.c_fc": {"kind": "ttm", "rank": 8}, "h.1.mlp.c_fc": "dense",
                               "attn.c_proj": LayerSpec(kind="lowrank", rank=4),
                               "embedding": {"kind": "ttm", "rank": 16, "in_dims": [8, 8, 8]}})
  again = GPTConfig.from_json(cfg.to_json())
  assert again == cfg and hash(again) == hash(cfg)
  assert cfg.spec("mlp.c_fc", 0).kind == "ttm" and cfg.spec("mlp.c_fc", 1).kind == "dense"
  assert cfg.spec("attn.c_attn", 0).kind == "dense"
  assert cfg.spec("embedding").in_dims == (8, 8, 8)


def test_gpt2_preset_has_124m_parameters():
  model = nnx.eval_shape(lambda: GPT(preset("gpt2"), rngs=nnx.Rngs(0)))
  assert model.num_params == 124_439_808
  untied = nnx.eval_shape(lambda: GPT(preset("gpt2", tie_embeddings=False), rngs=nnx.Rngs(0)))
  assert untied.num_params == 124_439_808 + 50257 * 768


def test_ttm_gpt2_has_fewer_parameters():
  cfg = preset("gpt2", layers={"mlp.c_fc": {"kind": "ttm", "rank": 64}, "mlp.c_proj": {"kind": "ttm", "rank": 64}})
  model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
  # two 768x3072 kernels per block become 542,720 core parameters each
  assert model.num_params == 124_439_808 - 12 * 2 * (768 * 3072 - 542_720)


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers={"mlp.fc": "dense"}), r"GPTConfig: layers key 'mlp.fc' is unknown"),
    (dict(layers={"h.5.mlp.c_fc": "dense"}), r"GPTConfig: layers key 'h.5.mlp.c_fc' names block 5 but n_layer=2"),
    (dict(layers={"mlp.c_fc": "ttm"}), r"GPTConfig: layers\['mlp.c_fc'\].rank=None but a positive integer"),
    (dict(layers={"mlp.c_fc": "tt"}), r"GPTConfig: layers\['mlp.c_fc'\].kind='tt' but one of"),
    (dict(layers={"lm_head": "dense"}), r"GPTConfig: layers\['lm_head'\] is set but tie_embeddings=True"),
    (dict(d_model=130), r"GPTConfig: d_model=130 but it must be divisible by n_head=4"),
    (dict(dropout=1.0), r"GPTConfig: dropout=1.0 but 0 <= dropout < 1"),
    (dict(n_layer=0), r"GPTConfig: n_layer=0 but a positive integer"),
    (dict(layers={"mlp.c_fc": {"kind": "lowrank", "rank": 4, "ranks": [4]}}),
     r"GPTConfig: layers\['mlp.c_fc'\].ranks=\(4,\) but per-bond ranks are for kind 'ttm' or 'mps'"),
    (dict(layers={"mlp.c_fc": {"kind": "ttm", "rank": 4, "ranks": [4]}}),
     r"GPTConfig: layers\['mlp.c_fc'\].ranks=\(4,\) but 2 entries \(one per bond\) are expected"),
    (dict(layers={"*": "lowrank"}), r"GPTConfig: layers\['\*'\].rank=None but a positive integer"),
])
def test_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    preset("tiny", **kwargs)


def test_every_projection_key_and_per_bond_ranks_rebuild_layers_exactly():
  cfg = preset("tiny", layers={"*": {"kind": "ttm", "rank": 8}, "mlp.c_fc": "dense",
                               "h.1.attn.c_proj": {"kind": "ttm", "rank": 8, "ranks": [3, 5]}})
  assert [cfg.spec(p, 0).kind for p in cfg.PROJECTIONS] == ["ttm", "ttm", "dense", "ttm"]
  assert cfg.spec("embedding").kind == "dense"  # "*" covers projections only
  model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
  assert model.h[1].attn.c_proj.ranks == (1, 3, 5, 1) and max(model.h[0].attn.c_proj.ranks) == 8
  assert type(cfg).from_json(cfg.to_json()) == cfg


def test_preset_and_model_errors():
  with pytest.raises(ValueError, match=r"preset: name='gpt3' but one of"):
    preset("gpt3")
  with pytest.raises(ValueError, match=r"GPTConfig: unknown fields \['n_embd'\]"):
    GPTConfig.from_dict({"n_embd": 5})
  assert jax.tree_util.tree_leaves(preset("tiny").to_dict()) is not None


@pytest.mark.parametrize("kwargs,match", [
    (dict(dims={"h.5": {"d_ff": 4}}), r"GPTConfig: dims key 'h.5' but 'h.<i>' with i < n_layer=2"),
    (dict(dims={"h.0": {"width": 4}}), r"GPTConfig: dims\['h.0'\] has unknown fields \['width'\]"),
    (dict(dims={"h.0": {"d_ff": 0}}), r"GPTConfig: dims\['h.0'\]\['d_ff'\]=0"),
    (dict(layers={"mlp.c_fc": {"kind": "mps", "rank": 2}}), r"layers\['mlp.c_fc'\].kind='mps' but 'mps' is for the"),
    (dict(layers={"mlp.c_fc": {"quant": "int4"}}), r"layers\['mlp.c_fc'\].quant='int4' but one of"),
    (dict(layers={"embedding": {"quant": "int8"}}), r"layers\['embedding'\].quant='int8' but only projections"),
    (dict(layers={"embedding": {"kind": "btt", "rank": 2}}),
     r"GPTConfig: layers\['embedding'\].kind='btt' but 'btt' is for projections and an untied lm_head; use one of "
     r"\('dense', 'ttm', 'lowrank', 'mps'\) for the embedding"),
    (dict(layers={"embedding": {"kind": "lowrank"}}), r"layers\['embedding'\].rank=None but a positive integer"),
])
def test_dims_mps_and_quant_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    preset("tiny", **kwargs)


def test_low_rank_embedding_spec_builds_and_round_trips():
  cfg = preset("tiny", layers={"embedding": LayerSpec(kind="lowrank", rank=8)})
  assert GPTConfig.from_json(cfg.to_json()) == cfg and cfg.padded_vocab == cfg.vocab_size
  model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
  assert type(model.wte).__name__ == "LowRankEmbedding" and model.wte.u.shape == (512, 8)
  # a rank above min(vocab, d_model) is capped, as for projections
  wide = nnx.eval_shape(lambda: GPT(preset("tiny", layers={"embedding": {"kind": "lowrank", "rank": 500}}),
                                    rngs=nnx.Rngs(0)))
  assert wide.wte.rank == 128


def test_block_dims_round_trip():
  cfg = preset("tiny", dims={"h.1": {"d_ff": 100, "qk_dim": 8}}, layers={"embedding": {"kind": "mps", "rank": 2}})
  assert cfg.block_dims(0) == (512, 32, 32) and cfg.block_dims(1) == (100, 8, 32)
  assert GPTConfig.from_json(cfg.to_json()) == cfg
