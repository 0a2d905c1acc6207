"""The models the network knows by name, and the dtypes it may pin, declared once.

Apart from :mod:`gonka_p2p.inference.models` (which builds them, and imports
torch to do so) so that the client library, the node options, the genesis and
the devnet tool can name the default model and check a dtype without loading an
engine.
"""

DEFAULT_MODEL = "smollm2-135m"  # SmolLM2-135M-Instruct, fp32: what a node serves unless told otherwise
TINY_MODEL = "tiny-llama"  # a small seeded Llama for tests (inference/tiny_model.py)

# The weight dtypes a genesis may pin per model (both engines load each; the verification
# thresholds are calibrated per model at its dtype). Where nothing is pinned: DEFAULT_DTYPE.
DTYPES = ("float32", "bfloat16")
DEFAULT_DTYPE = "float32"
