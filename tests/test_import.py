import subprocess
import sys

HEAVY = ("flax", "optax", "orbax", "transformers", "torch", "tokenizers", "safetensors", "matplotlib", "tqdm")


def test_import_tnjax_keeps_core_light():
  code = ("import sys, tnjax; "
          f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_public_api():
  import tnjax
  for name in tnjax.__all__:
    assert callable(getattr(tnjax, name)), name
