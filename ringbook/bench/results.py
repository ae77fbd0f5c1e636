"""Results files: one JSON object ``{"meta": …, "rows": […]}`` per run, written atomically and read with checks.

A row is what :mod:`ringbook.bench.sweep` or the multi-process sweep measured
(device, versions, configuration, time, memory, error, status). Everything
that draws or reports results reads them through :func:`load_results`, so a
report or plot can be redrawn at any time from a committed file.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_stem(rows: list[dict]) -> str:
    """``bench-<device>-<dtype>``, e.g. ``bench-nvidia-h100-80gb-hbm3-bfloat16``."""
    first = rows[0]
    device = "cpu" if first.get("device_type") == "cpu" else slug(first["device"])
    return f"bench-{device}-{first['dtype']}" + ("-fwd-bwd" if first.get("mode") == "forward+backward" else "")


def save_json(rows: list[dict], path: Path, meta: dict | None = None) -> Path:
    """Write ``{"meta": …, "rows": …}`` atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta or {}, "rows": rows}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


class ResultsFileError(ValueError):
    """A results file that cannot be read as benchmark rows; the message names the file and the problem."""


STATUSES = ("ok", "oom", "error", "skipped")  # skipped: not run by decision (predicted too slow)
# key: (types, description) of what every benchmark row carries (the report reads these)
ROW_FIELDS = {
    "impl": ((str,), "an implementation name"),
    "seq_len": ((int,), "a positive int"),
    "ring_size": ((int,), "a positive int"),
    "causal": ((bool,), "true or false"),
    "status": ((str,), f"one of {list(STATUSES)}"),
    "dtype": ((str,), "a dtype name"),
    "device": ((str,), "a device name"),
    "torch_version": ((str,), "a version string"),
    "batch": ((int,), "a positive int"),
    "heads": ((int,), "a positive int"),
    "head_dim": ((int,), "a positive int"),
}
OK_NUMBERS = ("time_ms", "tflops", "tokens_per_s", "max_rel_err")
OPTIONAL_NUMBERS = ("peak_mem_gb", "lse_max_rel_err", "grad_max_rel_err")  # null or absent where not measured


def check_row(row: Any, where: str) -> None:
    """Raise :class:`ResultsFileError` unless ``row`` is a benchmark row the report can draw.

    An ``ok`` row must have finite ``time_ms``, ``tflops``, ``tokens_per_s`` and
    ``max_rel_err`` (and a finite or missing ``peak_mem_gb``, ``lse_max_rel_err``
    and ``grad_max_rel_err``): a number that is not finite cannot be an ok result.
    """
    if not isinstance(row, dict):
        raise ResultsFileError(f"{where} must be an object, got {type(row).__name__}")
    for key, (types, what) in ROW_FIELDS.items():
        if key not in row:
            raise ResultsFileError(f"{where} has no {key!r} (expected {what})")
        value = row[key]
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise ResultsFileError(f"{where} has {key}={value!r}; expected {what}")
        if types == (int,) and value <= 0:
            raise ResultsFileError(f"{where} has {key}={value!r}; expected {what}")
    if row["status"] not in STATUSES:
        raise ResultsFileError(f"{where} has status={row['status']!r}; expected one of {list(STATUSES)}")
    if row["status"] == "ok":
        for key in OK_NUMBERS + tuple(k for k in OPTIONAL_NUMBERS if row.get(k) is not None):
            x = row.get(key)
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
                raise ResultsFileError(f"{where} has status 'ok' but {key}={x!r}; an ok row needs a finite number")


def load_results(path: str | Path, *, validate: bool = True) -> tuple[list[dict], dict]:
    """``(rows, meta)`` of a results file written by :func:`save_json` (or a bare list of rows).

    Raises :class:`ResultsFileError` naming the file for a missing, unreadable,
    empty, binary or corrupt file, or (with ``validate``) a row the report
    cannot draw (:func:`check_row`).
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ResultsFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ResultsFileError(f"{path} is a directory; expected a results .json file") from None
    except OSError as exc:
        raise ResultsFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ResultsFileError(f"{path} is not a text file; expected a results .json file") from None
    if not text.strip():
        raise ResultsFileError(f"{path} is empty; expected a results .json file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultsFileError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise ResultsFileError(f"{path} is nested too deeply to be a results file") from None
    if isinstance(data, list):
        rows, meta = data, {}
    elif isinstance(data, dict) and "rows" in data:
        rows, meta = data["rows"], data.get("meta") or {}
    else:
        keys = f" with keys {sorted(data)[:5]}" if isinstance(data, dict) else ""
        raise ResultsFileError(f"{path} is not a ringbook results file (expected an object with 'rows' or a list "
                               f"of rows, got {type(data).__name__}{keys})")
    if not isinstance(rows, list):
        raise ResultsFileError(f"{path}: 'rows' must be a list of rows, got {type(rows).__name__}")
    if not isinstance(meta, dict):
        raise ResultsFileError(f"{path}: 'meta' must be an object, got {type(meta).__name__}")
    for row in rows:  # files from before the "skipped" status recorded a decision not to run as an error
        if isinstance(row, dict) and row.get("status") == "error" and str(row.get("error") or "").startswith(
                "not run: a call is predicted to take"):
            row["status"] = "skipped"
    if validate:
        if not rows:
            raise ResultsFileError(f"{path} has no rows: nothing to report")
        for i, row in enumerate(rows):
            check_row(row, f"{path}: row {i}")
    return rows, meta


def load_rows(path: str | Path) -> list[dict]:
    """Rows of a results file written by :func:`save_json` (any row shape; see :func:`load_results`)."""
    return load_results(path, validate=False)[0]
