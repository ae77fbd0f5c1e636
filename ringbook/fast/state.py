"""What the fast path remembers between calls, in one place: kernel choices, probes, status, CUDA graphs.

The modules that compute (:mod:`~ringbook.fast.kernels`, :mod:`~ringbook.fast.merge`,
:mod:`~ringbook.fast.engine`) keep nothing of their own: they read and write
these tables, and :func:`reset_caches` forgets all of them. Nothing here
imports the modules that compute, so there is no import circle.

* :data:`STATUS` — what was chosen, skipped and why, ``{what: text}``
  (printed by ``tools/gpu_check_production.py``); warnings said once;
* :data:`CHOICE` / :data:`BACKWARD_OK` / :data:`AUX` — the forward kernel
  chosen per (device, dtype, head_dim, causal, GQA, backend), the backward
  op that agreed with the einops path, the backward ops' extra arguments;
* :data:`TRITON` — per device, ``True`` or why the Triton merge is not used;
* :data:`GRAPHS` — captured CUDA graphs per call shape
  (:func:`ringbook.fast.engine.run`); :data:`SIDE_STREAMS` — the engine's
  second CUDA stream per device.
"""

from __future__ import annotations

import warnings

STATUS: dict = {}
CHOICE: dict = {}  # (device, dtype, head_dim, causal, gqa, backend) -> (backend, expand K/V)
BACKWARD_OK: dict = {}  # (device, dtype, head_dim, causal, gqa, backend) -> (op, expand), or an error text
AUX: dict = {}  # (backward op, device) -> its extra arguments, from a tiny forward
TRITON: dict = {}  # device -> True or the reason the Triton merge is not used
GRAPHS: dict = {}  # (job key, tensor layouts) -> "seen once", a captured graph, or why capture was refused
SIDE_STREAMS: dict = {}  # device index -> the engine's second CUDA stream


def reset_caches() -> None:
    """Forget the kernel choices, probes, the merge's self-check and the captured CUDA graphs (and the memory
    they hold): for tests, after changing torch's settings, or to give a graph's working memory back."""
    for cache in (STATUS, CHOICE, BACKWARD_OK, AUX, TRITON, GRAPHS):
        cache.clear()


def warn_once(message: str) -> None:
    """Warn with ``message`` the first time it is said (it is then kept in :data:`STATUS`)."""
    if message not in STATUS:
        STATUS[message] = "warned"
        warnings.warn(message, stacklevel=3)
