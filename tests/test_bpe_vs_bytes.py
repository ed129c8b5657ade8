"""scripts/bpe_vs_bytes.py at its smoke settings: both runs train, the FLOPs accounting
gives the BPE run the byte run's budget, bits per byte convert through the validation
text's tokens per byte, the plot is written, and a rerun resumes (trains nothing and
reports the same figures)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bpe_vs_bytes", ROOT / "scripts" / "bpe_vs_bytes.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_run_accounts_flops_and_resumes(tmp_path: Path) -> None:
    script = _script()
    report, picture = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["--smoke", "--quiet", "--out", str(tmp_path / "out"), "--json", str(report),
            "--plot", str(picture), "--byte-steps", "8"]  # fmt: skip
    record = script.main(argv)
    assert json.loads(report.read_text()) == json.loads(json.dumps(record))
    assert picture.stat().st_size > 0
    runs = record["runs"]
    bytes_run, bpe_run = runs["bytes"], runs["bpe"]
    assert bytes_run["vocab_size"] == 256 and bpe_run["vocab_size"] == 320
    # The two models differ only in their vocabulary: the head's FLOPs per token.
    d_model = 64  # conf/model/tiny.yaml
    assert bpe_run["flops_per_token"] - bytes_run["flops_per_token"] == 6 * d_model * 64
    ratio = bytes_run["flops_per_token"] / bpe_run["flops_per_token"]
    assert bpe_run["steps"] == round(8 * ratio) and bytes_run["steps"] == 8
    assert bpe_run["train_flops"] == pytest.approx(bytes_run["train_flops"], rel=0.1)
    assert bytes_run["val_tokens_per_byte"] == 1.0 and 0.3 < bpe_run["val_tokens_per_byte"] < 0.8
    for run in runs.values():
        assert run["val_bpb"] == pytest.approx(
            run["val_loss_per_token"] / math.log(2) * run["val_tokens_per_byte"]
        )
        assert [point["step"] for point in run["curve"]][-1] == run["steps"]
    again = script.main(argv)
    for name in runs:
        assert again["runs"][name]["val_bpb"] == runs[name]["val_bpb"]
