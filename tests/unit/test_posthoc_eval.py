"""`sd-train posthoc --eval`'s choice, table and plot (sd_train.tools.posthoc_eval), on scored rows
made here: --select loss takes the lowest held-out loss, --select accuracy the highest prompt
accuracy with ties broken by the fidelity distance; the table's last line is what `make demo`
prints; the plot is a PNG from matplotlib, and without matplotlib it is skipped, saying why."""

import importlib.util

from PIL import Image

from sd_train.tools import posthoc_eval
from sd_train.tools.posthoc_eval import Scored, plot, select_best, table


def q(accuracy: float, fidelity: float) -> dict:
    return {"accuracy": accuracy, "accuracy_95": [accuracy - 0.1, min(1.0, accuracy + 0.05)], "fidelity": fidelity,
            "samples": 64, "chance": 1 / 16, "misses": {}}  # fmt: skip


ROWS = [
    Scored("raw", None, 0.4437, q(0.875, 0.077)),
    Scored("late_ema", None, 0.4403, q(0.953, 0.062)),
    Scored("sigma_rel_0.05", 0.05, 0.4412, q(0.969, 0.0563)),
    Scored("sigma_rel_0.15", 0.15, 0.4399, q(0.953, 0.062)),
    Scored("decay_0.98", 0.066, 0.4412, q(0.969, 0.0562)),
]


def test_select_by_loss_or_by_accuracy_with_the_fidelity_breaking_ties():
    targets = ROWS[2:]
    assert select_best(targets, "loss").name == "sigma_rel_0.15"
    assert select_best(targets, "accuracy").name == "decay_0.98"  # 0.969 twice: the closer one


def test_the_table_ends_with_the_accuracy_of_raw_late_ema_and_the_best():
    text = table(ROWS, select_best(ROWS[2:], "accuracy"), "accuracy")
    assert text.splitlines()[-1] == "prompt accuracy: raw 0.875, late EMA 0.953, best post-hoc (decay_0.98) 0.969"
    assert "[0.775, 0.925]" in text.splitlines()[1]  # raw's interval
    loss_only = [Scored(r.name, r.length, r.loss) for r in ROWS]
    assert "accuracy" not in table(loss_only, select_best(loss_only[2:], "loss"), "loss").splitlines()[0]


def test_plot_is_a_png_and_is_skipped_with_a_message_without_matplotlib(tmp_path, monkeypatch, capsys):
    png = plot(tmp_path / "p.png", ROWS, ROWS[4])
    assert png is not None and Image.open(png).size[0] > 300
    real = importlib.util.find_spec
    monkeypatch.setattr(posthoc_eval.importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n))
    assert plot(tmp_path / "q.png", ROWS, ROWS[4]) is None and not (tmp_path / "q.png").exists()
    assert "pip install 'sd-train[plot]'" in capsys.readouterr().out
