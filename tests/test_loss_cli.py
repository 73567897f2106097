"""`xmodal losses [PATTERN]`: every registered loss with its parameters, defaults, view and the fields it reads."""

from __future__ import annotations

import json

from xmodal.cli import main
from xmodal.losses import LOSSES


def test_lists_every_registered_loss_with_formula_view_and_needs(capsys):
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    for name in LOSSES.names():
        assert f"\n{name}: " in "\n" + out, name
    hinton = out.split("\nhinton: ")[1].split("\n\n")[0]
    assert "T²·KL(p_T^T ‖ p_S^T)" in hinton and "Hinton et al., 2015" in hinton
    assert "needs: student image.logits; teacher image.logits" in hinton
    assert "params: modality='image', temperature=4.0" in hinton and "view: native" in hinton


def test_pattern_filters_by_glob_and_json_gives_parameters_and_needs(capsys):
    assert main(["losses", "rkd*", "--json"]) == 0
    infos = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in infos] == ["rkd_angle", "rkd_distance"]
    assert {"name": "level", "default": "pooled", "type": "str"} in infos[0]["params"]
    assert infos[0]["needs"] == [{"role": "student", "modality": "image", "field": "pooled"},
                                 {"role": "teacher", "modality": "image", "field": "pooled"}]
    assert main(["losses", "taid", "--json"]) == 0
    (taid,) = json.loads(capsys.readouterr().out)
    total = next(p for p in taid["params"] if p["name"] == "total_steps")
    assert total.get("required") and taid["needs"][0]["field"] == "logits"
    assert main(["losses", "nd", "--json"]) == 0
    (nd,) = json.loads(capsys.readouterr().out)
    assert nd["view"] == "projected" and nd["batch_keys"] == ["label"]


def test_no_match_says_so(capsys):
    assert main(["losses", "nothing*"]) == 1
    assert "no registered loss matches 'nothing*'" in capsys.readouterr().err
