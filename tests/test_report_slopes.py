"""The report's slope table, on rows whose latency follows a known power of the length."""

from helpers import make_row

from bench.report import write_report
from bench.results import write_row


def test_report_lists_fitted_slopes(tmp_path):
    for impl, power in (("reference", 2.0), ("fast", 1.0)):
        for n in (1024, 2048, 4096, 8192):
            latency = 1e-3 * n**power
            write_row(tmp_path, make_row(f"{impl}{n}", method="m", impl=impl, dtype="float32", seq_len=n, kv_len=n,
                                         latency_ms=latency, latency_samples_ms=[latency]))  # fmt: skip
    text = write_report(tmp_path).read_text()
    section = text.split("## Scaling slopes")[1].split("\n## ")[0]
    assert "All curves: B×H×D=1×8×64, input_dist=gaussian." in section  # what all curves share, said once
    assert "| method | impl | pattern | mode | dtype | slope | lengths | points |" in section
    assert "| m | reference | causal | fwd | float32 | 2.00 | 1024–8192 | 4 |" in section
    assert "| m | fast | causal | fwd | float32 | 1.00 | 1024–8192 | 4 |" in section
