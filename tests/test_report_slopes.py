"""The report's slope table, on rows whose latency follows a known power of the length."""

from bench.report import write_report
from bench.results import CORE_COLUMNS, write_row


def test_report_lists_fitted_slopes(tmp_path):
    for impl, power in (("reference", 2.0), ("fast", 1.0)):
        for n in (1024, 2048, 4096, 8192):
            row = dict.fromkeys(CORE_COLUMNS)
            row.update(cell_id=f"{impl}{n}", method="m", impl=impl, task="scaling", status="ok", reason="",
                       dtype="float32", batch=1, heads=8, seq_len=n, kv_len=n, head_dim=64, causal=True, mode="fwd",
                       latency_ms=1e-3 * n**power, latency_samples_ms=[1e-3 * n**power])
            write_row(tmp_path, row)
    text = write_report(tmp_path).read_text()
    section = text.split("## Scaling slopes")[1]
    assert "| m | reference | causal | fwd | float32 | 1 | 8 | 64 | 2.00 | 1024–8192 | 4 |" in section
    assert "| m | fast | causal | fwd | float32 | 1 | 8 | 64 | 1.00 | 1024–8192 | 4 |" in section
