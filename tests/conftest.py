"""Test-wide settings. Thread counts are pinned before torch is imported: the
machines are shared and oversubscribed BLAS threads make torch ~10x slower."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
