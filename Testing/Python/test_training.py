"""The training recipe's pieces that run in seconds: its plans resolve in nnU-Net, its regions are what inference
crops, its schedule is checked before any work.

Training itself takes hours on this CPU; the recipe's results are checked by the benchmark and the model card.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FemurSegLib import training
from FemurSegLib.synthetic.cases import generate_case
from FemurSegLib.models import resolve_model


@pytest.fixture()
def work_dir(tmp_path: Path) -> Path:
    """A work dir whose preprocessed plans are nnU-Net planner output (the v3 model's record of it)."""
    bundled = resolve_model(None).trained_folder
    plans = json.loads((bundled / "plans.json").read_text())
    plans["configurations"] = {"3d_fullres": plans["configurations"]["3d_fullres"]}  # as the planner writes it
    for _, dataset in training.DATASETS.values():
        folder = tmp_path / "preprocessed" / dataset
        folder.mkdir(parents=True)
        (folder / "nnUNetPlans.json").write_text(json.dumps({**plans, "dataset_name": dataset}))
    return tmp_path


def test_recipe_configurations_resolve_in_nnunet(work_dir: Path) -> None:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    for name, settings in training.RECIPE_CONFIGURATIONS.items():
        training.add_recipe_configuration(work_dir, name)
        plans = json.loads((work_dir / "preprocessed" / training.DATASETS[name][1] / "nnUNetPlans.json").read_text())
        configuration = PlansManager(plans).get_configuration(name)
        assert configuration.spacing == settings["spacing"] and configuration.patch_size == settings["patch_size"]
        assert configuration.data_identifier == f"nnUNetPlans_{name}"  # never mixed with the planner's 3d_fullres data
        assert configuration.network_arch_init_kwargs["features_per_stage"] == [8, 16, 32, 64, 128]
        divisor = np.prod(configuration.network_arch_init_kwargs["strides"], axis=0)
        assert all(p % d == 0 for p, d in zip(configuration.patch_size, divisor))


def test_every_twenty_cases_hold_the_family_mix() -> None:
    for start in (0, 20, 40):
        assert Counter(training.case_family(i) for i in range(start, start + 20)) == dict(training.FAMILY_MIX)
    assert len({training.case_family(i) for i in range(5)}) > 1, "a short run still mixes families"


def test_regions_hold_each_whole_femur_with_its_margin() -> None:
    ct, label, info = generate_case("invivo", 2)
    regions = training.femur_regions(ct, label, np.random.default_rng(0))
    assert len(regions) == len(info.sides) == 2
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.Execute(sitk.ConnectedComponent(label, True))
    femur_voxels = sorted(statistics.GetNumberOfPixels(i) for i in statistics.GetLabels())
    assert sorted(int(sitk.GetArrayViewFromImage(region_label).sum()) for _, region_label in regions) == femur_voxels
    low_margin, high_margin = training.REGION_MARGIN_MM
    for region_ct, region_label in regions:
        assert region_ct.GetSize() == region_label.GetSize() and region_ct.GetOrigin() == region_label.GetOrigin()
        mask = sitk.GetArrayViewFromImage(region_label) != 0
        start = np.array(ct.TransformPhysicalPointToIndex(region_ct.GetOrigin()))[::-1]  # (z, y, x) in the CT
        stop = start + np.array(mask.shape)
        for axis in range(3):
            spacing = region_ct.GetSpacing()[2 - axis]
            occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
            gaps = {"low": (occupied[0], start[axis] == 0), "high": (mask.shape[axis] - 1 - occupied[-1],
                                                                      stop[axis] == ct.GetSize()[2 - axis])}
            for gap, at_ct_border in gaps.values():
                assert gap * spacing <= high_margin + spacing
                assert gap * spacing >= low_margin - spacing or at_ct_border  # the field of view ends there


def test_widened_legacy_cases_keep_every_voxel_in_place_inside_air_or_their_own_water() -> None:
    ct, label, _ = generate_case("legacy", 1)
    array, truth = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(label)
    water = float(np.median(array[:, :, :3]))
    outcomes = Counter()
    for seed in range(12):
        wide_ct, wide_label = training.widen_field_of_view(ct, label, np.random.default_rng(seed))
        assert wide_ct.GetSpacing() == ct.GetSpacing() and wide_ct.GetDirection() == ct.GetDirection()
        assert wide_label.GetOrigin() == wide_ct.GetOrigin() and wide_label.GetSize() == wide_ct.GetSize()
        start = np.array(wide_ct.TransformPhysicalPointToIndex(ct.GetOrigin()))  # the old voxel (0, 0, 0)
        added = np.array(wide_ct.GetSize()) - np.array(ct.GetSize())
        assert (start >= 0).all() and (added - start >= 0).all()
        assert (np.maximum(start, added - start) * np.array(ct.GetSpacing()) <= training.LEGACY_WIDENING_MM + 1).all()
        inner = tuple(slice(a, a + n) for a, n in zip(start[::-1], array.shape))
        wide = sitk.GetArrayFromImage(wide_ct)
        assert np.array_equal(wide[inner], array) and np.array_equal(sitk.GetArrayFromImage(wide_label)[inner], truth)
        assert sitk.GetArrayViewFromImage(wide_label).sum() == truth.sum(), "no femur in the added margin"
        margin = np.ones(wide.shape, dtype=bool)
        margin[inner] = False
        if not margin.any():
            outcomes["unchanged"] += 1
            continue
        level = float(np.median(wide[margin]))
        assert abs(level + 1000) < 5 or abs(level - water) < 5, level
        assert 5 < float(np.std(wide[margin])) < 60, "noise like the phantom's own"
        outcomes["air" if level < -500 else "water"] += 1
    assert set(outcomes) == {"unchanged", "air", "water"}


@pytest.mark.parametrize("arguments, problem", [
    (["--fine-epochs", "200", "120"], "--fine-epochs 200 120 must increase"),
    (["--cases", "1"], "at least 2 training cases"),
])
def test_recipe_refuses_a_schedule_it_cannot_run_before_touching_the_work_dir(tmp_path: Path, capsys, arguments,
                                                                              problem) -> None:
    from FemurSegLib.cli import main

    work_dir = tmp_path / "work"
    assert main(["train-bundled", str(work_dir), *arguments]) == 2
    assert problem in capsys.readouterr().err
    assert not work_dir.exists()
