"""The whole-iteration table: stock / fpn_rpn ratios and speed-up savings are taken per round."""
import fpn_rpn  # noqa: F401  # before detectron2

from fpn_rpn.analysis.whole_iteration import OURS, STOCK, WholeResult, format_whole_table, without


def test_ratios_and_savings_are_per_round():
    times = {STOCK: [2.0, 3.0, 4.0], OURS: [1.0, 2.0, 2.0], without("anchor_cache"): [2.0, 2.0, 4.0]}
    table = format_whole_table([WholeResult("demo", "train", 4, times)]).splitlines()
    assert table[0].startswith("| config | setting | images | variant |")
    rows = {line.split(" | ")[3]: line for line in table[2:]}
    # per round: 2/1, 3/2, 4/2 -> median 2.00, range [1.50, 2.00]
    assert rows[STOCK].endswith("| 3.000 [2.000, 4.000] | stock / fpn_rpn 2.00x [1.50x, 2.00x] |")
    assert rows[OURS].endswith("| 2.000 [1.000, 2.000] | - |")
    # per round 1 - on/off: 50%, 0%, 50%
    assert rows["fpn_rpn without anchor_cache"].endswith("| saves +50.0% [+0.0%, +50.0%] |")
