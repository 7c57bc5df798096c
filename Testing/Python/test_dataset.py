"""Tests of the nnU-Net dataset exporter: nnU-Net's own verifier, bit-exact round trips, refusals that leave the
dataset untouched, SIGKILL at random points, and two exporters at once."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FemurSegLib import __version__
from FemurSegLib.dataset import LISTING_MARKER, LOCK_FILE, STAGING_PREFIX, export_case, recover_dataset
from FemurSegLib.errors import FemurSegError

REPO = Path(__file__).resolve().parents[2]
SEED_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "bone": 1}, "numTraining": 1,
             "file_ending": ".nrrd", "reference": "Dall'Ara 2013"}


def small_case(seed: int = 0, dtype=np.int16) -> tuple[sitk.Image, sitk.Image]:
    """A 20x16x12 CT with an oblique grid and a box label: fast to write, geometry non-trivial."""
    rng = np.random.default_rng(seed)
    ct = sitk.GetImageFromArray(rng.integers(-1024, 2000, size=(12, 16, 20)).astype(dtype))
    ct.SetSpacing((0.7, 0.8, 1.25))
    ct.SetOrigin((-10.5, 3.25, 100.0))
    ct.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    mask = np.zeros((12, 16, 20), np.uint8)
    mask[3:9, 4:12, 5 + seed % 5:15] = 1
    label = sitk.GetImageFromArray(mask)
    label.CopyInformation(ct)
    return ct, label


def tree_hashes(folder: Path) -> dict[str, str]:
    """Every file's SHA-256 and every folder, by relative path; the exporter's lock file is left out."""
    hashes = {}
    for path in sorted(folder.rglob("*")):
        if path.name != LOCK_FILE:
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            hashes[path.relative_to(folder).as_posix()] = digest
    return hashes


def verify_with_nnunet(*folders: Path) -> None:
    """Run nnunetv2's verify_dataset_integrity on each folder, in one fresh interpreter (it imports torch)."""
    code = textwrap.dedent("""
        import sys
        from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
        for folder in sys.argv[1:]:
            verify_dataset_integrity(folder, num_processes=1)
    """)
    paths = dict.fromkeys(("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"), str(folders[0].parent))
    env = {**os.environ, **paths}
    done = subprocess.run([sys.executable, "-c", code, *map(str, folders)], capture_output=True, text=True, env=env,
                          timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert output.count("verify_dataset_integrity Done") == len(folders), output
    assert "Error" not in done.stdout and "Warning" not in done.stdout, output


def read_array(path: Path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def assert_case_matches(result, ct: sitk.Image, label: sitk.Image, femur_value: int = 1) -> None:
    """The image is the CT bit for bit; the label is the input label's mask on exactly the CT's grid, uint8."""
    ct_array, written_ct = read_array(result.image_path)
    assert written_ct.GetPixelID() == ct.GetPixelID()
    assert ct_array.dtype == sitk.GetArrayViewFromImage(ct).dtype
    assert np.array_equal(ct_array, sitk.GetArrayViewFromImage(ct))
    label_array, written_label = read_array(result.label_path)
    assert written_label.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(label_array, (sitk.GetArrayViewFromImage(label) != 0).astype(np.uint8) * femur_value)
    for image in (written_ct, written_label):
        assert image.GetSize() == ct.GetSize()
        assert np.allclose(image.GetSpacing(), ct.GetSpacing(), atol=1e-6)
        assert np.allclose(image.GetOrigin(), ct.GetOrigin(), atol=1e-6)
        assert np.allclose(image.GetDirection(), ct.GetDirection(), atol=1e-6)


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def seed_dataset(tmp_path: Path) -> Path:
    """The seed's layout: .nrrd, label named 'bone', one case F7L_fall, an extra key."""
    dataset = tmp_path / "nnUNet_raw" / "Dataset101_FemurCorrected"
    for folder in ("imagesTr", "labelsTr"):
        (dataset / folder).mkdir(parents=True)
    ct, label = small_case(7)
    sitk.WriteImage(ct, str(dataset / "imagesTr" / "F7L_fall_0000.nrrd"), True)
    sitk.WriteImage(label, str(dataset / "labelsTr" / "F7L_fall.nrrd"), True)
    (dataset / "dataset.json").write_text(json.dumps(SEED_JSON, indent=2))
    return dataset


def test_export_sequence_passes_nnunet_verification_and_round_trips_exactly(tmp_path: Path,
                                                                            seed_dataset: Path) -> None:
    from FemurSegLib.synthetic.phantom import generate_phantom  # here, so that the exporter subprocesses do not import scipy

    dataset = tmp_path / "nnUNet_raw" / "Dataset102_FemurNew"
    phantom_ct, phantom_label, _ = generate_phantom(3)
    sitk.WriteImage(phantom_ct, str(tmp_path / "phantom_ct.nrrd"), True)
    sitk.WriteImage(phantom_label, str(tmp_path / "phantom_label.nrrd"), True)
    metrics = {"dice": 0.93, "changed_voxels": 1234}
    first = export_case(tmp_path / "phantom_ct.nrrd", tmp_path / "phantom_label.nrrd", dataset, "P3_right",
                        provenance={"model": {"name": "femurseg-nnunet", "version": "1"}, "metrics": metrics},
                        description="corrected femur labels")
    assert_case_matches(first, phantom_ct, phantom_label)
    ct, label = small_case(1)
    second = export_case(ct, label, dataset, "S1")
    float_ct = sitk.Cast(ct, sitk.sitkFloat32) * 1.0001 - 0.25
    held_out = export_case(float_ct, label, dataset, "T1", test=True)
    assert_case_matches(second, ct, label)
    assert_case_matches(held_out, float_ct, label)
    assert (first.num_training, second.num_training, held_out.num_training) == (1, 2, 2)
    assert held_out.image_path == dataset / "imagesTs" / "T1_0000.nii.gz"
    assert held_out.label_path == dataset / "labelsTs" / "T1.nii.gz"
    assert load_json(dataset / "dataset.json") == {
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "femur": 1}, "numTraining": 2,
        "file_ending": ".nii.gz", "name": "FemurNew", "description": "corrected femur labels"}
    record = load_json(first.provenance_path)
    assert first.provenance_path == dataset / "femurseg" / "P3_right.json"
    assert record["sources"] == {"ct": "phantom_ct.nrrd", "label": "phantom_label.nrrd"}
    assert record["metrics"] == metrics and record["model"]["name"] == "femurseg-nnunet"
    assert record["split"] == "train" and load_json(held_out.provenance_path)["split"] == "test"
    assert record["femurseg_version"] == __version__ and record["exported_utc"].endswith("+00:00")

    old_label_bytes = second.label_path.read_bytes()
    corrected = sitk.BinaryDilate(label, (1, 1, 1))
    again = export_case(ct, corrected, dataset, "S1", replace=True, provenance={"metrics": {"dice": 0.8}})
    assert_case_matches(again, ct, corrected)
    assert again.num_training == 2 and again.replaced_dir is not None
    assert (again.replaced_dir / "labelsTr" / "S1.nii.gz").read_bytes() == old_label_bytes
    assert (again.replaced_dir / "imagesTr" / "S1_0000.nii.gz").is_file()
    assert (again.replaced_dir / "femurseg" / "S1.json").is_file()

    seed_before = tree_hashes(seed_dataset)
    appended = export_case(ct, label, seed_dataset, "S2_fall")
    assert appended.label_path == seed_dataset / "labelsTr" / "S2_fall.nrrd"
    assert appended.num_training == 2
    assert_case_matches(appended, ct, label)
    seed_json = load_json(seed_dataset / "dataset.json")
    assert list(seed_json) == list(SEED_JSON) and seed_json == {**SEED_JSON, "numTraining": 2}
    seed_after = tree_hashes(seed_dataset)
    for name in ("imagesTr/F7L_fall_0000.nrrd", "labelsTr/F7L_fall.nrrd"):
        assert seed_after[name] == seed_before[name]
    verify_with_nnunet(dataset, seed_dataset)


def test_label_of_another_pixel_type_is_written_as_uint8(tmp_path: Path) -> None:
    ct, label = small_case(2)
    result = export_case(ct, sitk.Cast(label, sitk.sitkInt16), tmp_path / "Dataset103_Binary", "case-1")
    assert_case_matches(result, ct, label)


@pytest.fixture
def dataset_with_case(tmp_path: Path) -> Path:
    dataset = tmp_path / "Dataset104_Refusals"
    export_case(*small_case(0), dataset, "A1")
    return dataset


def _grid_shifted() -> tuple[sitk.Image, sitk.Image]:
    ct, label = small_case(3)
    label.SetOrigin((0.0, 0.0, 0.0))
    return ct, label


def _values(*values: int) -> tuple[sitk.Image, sitk.Image]:
    ct, label = small_case(3)
    array = sitk.GetArrayFromImage(label)
    array[array != 0] = values[0]
    array[0, 0, : len(values) - 1] = values[1:]
    changed = sitk.GetImageFromArray(array)
    changed.CopyInformation(ct)
    return ct, changed


def _empty() -> tuple[sitk.Image, sitk.Image]:
    ct, label = small_case(3)
    return ct, label * 0


def _two_d() -> tuple[sitk.Image, sitk.Image]:
    ct, _ = small_case(3)
    return ct[:, :, 0], small_case(3)[1]


def _vector() -> tuple[sitk.Image, sitk.Image]:
    ct, label = small_case(3)
    return sitk.Compose(ct, ct), label


def _nan_ct() -> tuple[sitk.Image, sitk.Image]:
    ct, label = small_case(3, np.float32)
    array = sitk.GetArrayFromImage(ct)
    array[1, 2, 3] = np.nan
    nan_ct = sitk.GetImageFromArray(array)
    nan_ct.CopyInformation(ct)
    return nan_ct, label


@pytest.mark.parametrize(
    "make_inputs, case, options, message",
    [
        (small_case, "A1", {}, "Case 'A1' already exists"),
        (small_case, "A1", {"test": True}, "Case 'A1' already exists"),
        (_grid_shifted, "B1", {}, "not on the same voxel grid"),
        (lambda: _values(1, 2), "B1", {}, "must be binary"),
        (lambda: _values(2), "B1", {}, "value 2, which is not in"),
        (_empty, "B1", {}, "label is empty"),
        (_two_d, "B1", {}, "is 2D"),
        (_vector, "B1", {}, "2 components per voxel"),
        (_nan_ct, "B1", {}, "NaN"),
        (small_case, "B1", {"provenance": {"when": object()}}, "cannot be stored as JSON"),
        (small_case, "../B1", {}, "Case name '../B1' is invalid"),
        (small_case, "a/b", {}, "is invalid"),
        (small_case, "with space", {}, "is invalid"),
        (small_case, "B1.nii", {}, "is invalid"),
        (small_case, "", {}, "Case name '' is invalid"),
        (small_case, "B1_0000", {}, "channel suffix"),
        (small_case, "B1", {"file_ending": ".png"}, "File ending '.png' is not supported"),
    ],
)
def test_refusal_leaves_dataset_unchanged(dataset_with_case: Path, make_inputs, case, options, message) -> None:
    before = tree_hashes(dataset_with_case)
    with pytest.raises(FemurSegError, match=message) as refusal:
        export_case(*make_inputs(), dataset_with_case, case, **options)
    assert "\n" not in str(refusal.value)
    assert tree_hashes(dataset_with_case) == before


@pytest.mark.parametrize("name", ["Dataset1_Short", "Dataset1011_Long", "Task101_Old", "Dataset101_bad name",
                                  "Dataset101_"])
def test_invalid_dataset_folder_name_is_refused_and_nothing_created(tmp_path: Path, name: str) -> None:
    with pytest.raises(FemurSegError, match="not a valid nnU-Net dataset folder name"):
        export_case(*small_case(), tmp_path / name, "A1")
    assert list(tmp_path.iterdir()) == []


def test_unparseable_dataset_json_is_never_rewritten(dataset_with_case: Path) -> None:
    (dataset_with_case / "dataset.json").write_text('{"channel_names": {"0": "CT"}, "labels": ')
    before = tree_hashes(dataset_with_case)
    with pytest.raises(FemurSegError, match="does not parse as JSON.*will not rewrite it"):
        export_case(*small_case(5), dataset_with_case, "B1")
    with pytest.raises(FemurSegError, match="does not parse as JSON"):
        recover_dataset(dataset_with_case)
    assert tree_hashes(dataset_with_case) == before


def test_dataset_json_with_several_foreground_labels_is_refused(dataset_with_case: Path) -> None:
    dataset_json = load_json(dataset_with_case / "dataset.json")
    dataset_json["labels"]["cortex"] = 2
    (dataset_with_case / "dataset.json").write_text(json.dumps(dataset_json))
    before = tree_hashes(dataset_with_case)
    with pytest.raises(FemurSegError, match="exactly one femur label"):
        export_case(*small_case(5), dataset_with_case, "B1")
    assert tree_hashes(dataset_with_case) == before


def _fail_on_call(number: int, error: OSError, original):
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == number:
            raise error
        return original(*args, **kwargs)

    return failing


@pytest.mark.parametrize(
    "target, call, error, test, message",
    [
        ("SimpleITK.WriteImage", 2, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), True, "Disk full"),
        ("os.write", 1, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), False, "Disk full"),
        ("SimpleITK.WriteImage", 1, PermissionError(errno.EACCES, os.strerror(errno.EACCES)), True, "Cannot write"),
        ("os.replace", 1, PermissionError(errno.EACCES, os.strerror(errno.EACCES)), False, "Cannot write"),
    ],
)
def test_write_failure_mid_export_leaves_dataset_unchanged(dataset_with_case: Path, monkeypatch, target, call, error,
                                                            test, message) -> None:
    """ENOSPC or EACCES from a low-level write, as a full disk or (as root, where chmod does not stop writes) a
    read-only folder would raise them, after part of the case has been written."""
    before = tree_hashes(dataset_with_case)
    module_name, function_name = target.rsplit(".", 1)
    module = sys.modules[module_name]
    with monkeypatch.context() as patch:
        patch.setattr(module, function_name, _fail_on_call(call, error, getattr(module, function_name)))
        with pytest.raises(FemurSegError, match=message) as refusal:
            export_case(*small_case(5), dataset_with_case, "B1", test=test)
    assert "left unchanged" in str(refusal.value)
    assert tree_hashes(dataset_with_case) == before


def _as_unprivileged(command: list[str]) -> list[str]:
    """Root ignores file modes; drop the capabilities that let it, so a read-only folder is read-only."""
    if os.geteuid() != 0:
        return command
    if shutil.which("capsh") is None:
        pytest.skip("running as root without capsh: cannot make a folder read-only for this process")
    return ["capsh", "--drop=cap_dac_override,cap_dac_read_search,cap_fowner", "--", "-c", shlex.join(command)]


@pytest.mark.parametrize("read_only", ["labelsTr", "."])
def test_read_only_dataset_is_refused(dataset_with_case: Path, tmp_path: Path, read_only: str) -> None:
    ct, label = small_case(5)
    sitk.WriteImage(ct, str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(label, str(tmp_path / "label.nrrd"))
    before = tree_hashes(dataset_with_case)
    folder = dataset_with_case / read_only
    os.chmod(folder, 0o555)
    command = [sys.executable, "-m", "FemurSegLib", "export", str(tmp_path / "ct.nrrd"), str(tmp_path / "label.nrrd"),
               str(dataset_with_case), "--case", "B1"]
    try:
        result = subprocess.run(_as_unprivileged(command), capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    finally:
        os.chmod(folder, 0o755)
    assert result.returncode == 2, result.stderr
    assert "not writable" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert tree_hashes(dataset_with_case) == before


def test_dataset_path_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "nnUNet_raw").write_text("not a folder")
    with pytest.raises(FemurSegError, match="does not exist \\(or is not a folder\\)"):
        export_case(*small_case(), tmp_path / "nnUNet_raw" / "Dataset105_X", "A1")


def test_recovery_moves_orphans_aside_and_fixes_num_training(dataset_with_case: Path) -> None:
    orphan_image = dataset_with_case / "imagesTr" / "Gone_0000.nii.gz"
    orphan_label = dataset_with_case / "labelsTr" / "Half.nii.gz"
    orphan_image.write_bytes(b"image of an interrupted export")
    orphan_label.write_bytes(b"label of an interrupted export")
    (dataset_with_case / f"{STAGING_PREFIX}x1").mkdir()
    dataset_json = load_json(dataset_with_case / "dataset.json")
    (dataset_with_case / "dataset.json").write_text(json.dumps({**dataset_json, "numTraining": 5}))
    moved = recover_dataset(dataset_with_case)
    assert sorted(path.name for path in moved) == ["Gone_0000.nii.gz", "Half.nii.gz"]
    assert all(path.is_file() and "femurseg/recovered" in path.as_posix() for path in moved)
    assert not orphan_image.exists() and not orphan_label.exists()
    assert not list(dataset_with_case.glob(f"{STAGING_PREFIX}*"))
    assert load_json(dataset_with_case / "dataset.json")["numTraining"] == 1
    assert recover_dataset(dataset_with_case) == []


WORKER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from FemurSegLib.dataset import export_case
    from test_dataset import small_case
    if sys.argv[4] == "slow-renames":  # widen the gaps between renames so that random kills land in them
        rename = os.replace
        os.replace = lambda *args: (rename(*args), time.sleep(0.02))[0]
    dataset, prefix = sys.argv[1], sys.argv[2]
    cases = [small_case(seed) for seed in range(4)]
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit(1)
    for number in range(int(sys.argv[3])):
        ct, label = cases[number % 4]
        if number % 3 == 2:
            export_case(ct, label, dataset, f"{{prefix}}{{number - 1}}", replace=True,
                        provenance={{"metrics": {{"n": number}}}})
        else:
            export_case(ct, label, dataset, f"{{prefix}}{{number}}", test=number % 7 == 6)
    print("finished", flush=True)
""").format(repo=str(REPO))


def start_worker(dataset: Path, prefix: str, count: int, mode: str = "normal") -> subprocess.Popen:
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(dataset), prefix, str(count), mode],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert worker.stdout.readline().strip() == "ready"
    return worker


def case_states(dataset: Path, ending: str = ".nii.gz") -> dict[str, tuple[bool, bool]]:
    """(image present, label present) per case and split, as nnU-Net would find them."""
    states = {}
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        for path in (dataset / images).glob(f"*_0000{ending}"):
            states[f"{images}/{path.name[:-len(ending) - 5]}"] = (True, False)
        for path in (dataset / labels).glob(f"*{ending}"):
            key = f"{images}/{path.name[:-len(ending)]}"
            states[key] = (states.get(key, (False, False))[0], True)
    return states


def assert_valid_after_kill(dataset: Path) -> None:
    """What nnU-Net sees is consistent (numTraining may be off by one until the next export's recovery)."""
    states = case_states(dataset)
    assert (True, False) not in states.values(), states  # never an image without its label
    complete = [key for key, state in states.items() if state == (True, True)]
    train_complete = sum(key.startswith("imagesTr/") for key in complete)
    assert abs(load_json(dataset / "dataset.json")["numTraining"] - train_complete) <= 1
    for key in complete:
        images, case = key.split("/")
        labels = images.replace("images", "labels")
        ct = sitk.ReadImage(str(dataset / images / f"{case}_0000.nii.gz"))
        label = sitk.ReadImage(str(dataset / labels / f"{case}.nii.gz"))
        assert ct.GetSize() == label.GetSize() == (20, 16, 12)
    recover_dataset(dataset)
    states = case_states(dataset)
    assert set(states.values()) <= {(True, True)}
    train_labels = len(list((dataset / "labelsTr").glob("*.nii.gz")))
    train_images = len(list((dataset / "imagesTr").iterdir()))
    assert load_json(dataset / "dataset.json")["numTraining"] == train_labels == train_images
    assert not list(dataset.glob(f"{STAGING_PREFIX}*"))


def test_sigkill_at_random_points_keeps_dataset_valid(tmp_path: Path) -> None:
    dataset = tmp_path / "Dataset106_Killed"
    export_case(*small_case(0), dataset, "first")
    chooser = random.Random(20240611)
    finished = 0
    for run in range(20):
        worker = start_worker(dataset, f"r{run}_", 40, "slow-renames")
        worker.stdin.write("go\n")
        worker.stdin.flush()
        time.sleep(chooser.uniform(0.0, 0.4))
        worker.send_signal(signal.SIGKILL)
        worker.communicate()
        finished += worker.returncode == 0
        assert_valid_after_kill(dataset)
    assert finished < 20, "no run was killed mid-loop: raise the number of exports per run"
    export_case(*small_case(1), dataset, "last")
    verify_with_nnunet(dataset)


def test_two_concurrent_exporters_both_land(tmp_path: Path) -> None:
    dataset = tmp_path / "Dataset107_Concurrent"
    workers = [start_worker(dataset, prefix, 6) for prefix in ("a", "b")]  # cases 0, 1, 3, 4; 1 and 4 replaced
    for worker in workers:
        worker.stdin.write("go\n")
        worker.stdin.flush()
    for worker in workers:
        output, _ = worker.communicate(timeout=120)
        assert worker.returncode == 0 and "finished" in output
    names = sorted(path.name for path in (dataset / "labelsTr").iterdir())
    assert names == [f"{prefix}{number}.nii.gz" for prefix in "ab" for number in (0, 1, 3, 4)]
    assert load_json(dataset / "dataset.json")["numTraining"] == 8
    assert len(list((dataset / "femurseg").glob("*.json"))) == 8
    assert len(list((dataset / "femurseg" / "replaced").iterdir())) == 4


STEP_WORKER = textwrap.dedent("""
    import os, shutil, signal, sys
    sys.path.insert(0, {repo!r})
    from FemurSegLib import dataset
    from test_dataset import small_case

    def killed_at(step, action):
        '''Run ``action`` in a forked child that SIGKILLs itself just before its step-th rename, link, fsync or
        rmtree.'''
        pid = os.fork()
        if pid == 0:
            calls = [0]
            def hook(original):
                def wrapped(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == step:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return original(*args, **kwargs)
                return wrapped
            os.replace, os.link, os.fsync = hook(os.replace), hook(os.link), hook(os.fsync)
            shutil.rmtree = hook(shutil.rmtree)
            action()
            os._exit(0)
        return os.WIFSIGNALED(os.waitpid(pid, 0)[1])

    template, root = sys.argv[1], sys.argv[2]
    ct, label = small_case(3)
    step = 1
    while True:
        folder = os.path.join(root, f"Dataset{{100 + step:03d}}_Step")
        shutil.copytree(template, folder)
        if not killed_at(step, lambda: dataset.export_case(ct, label, folder, "S1", replace=True)):
            break
        print(folder, flush=True)
        step += 1
    # A recovery killed part-way is finished by the next one: kill the export mid-way, then its recovery twice.
    folder = os.path.join(root, "Dataset099_RecoveryKilled")
    shutil.copytree(template, folder)
    assert killed_at(step // 2, lambda: dataset.export_case(ct, label, folder, "S1", replace=True))
    assert killed_at(2, lambda: dataset.recover_dataset(folder))
    assert killed_at(4, lambda: dataset.recover_dataset(folder))
    print(folder, flush=True)
""").format(repo=str(REPO))


def _pair(dataset: Path, case: str) -> tuple[np.ndarray, np.ndarray] | None:
    image, label = dataset / "imagesTr" / f"{case}_0000.nii.gz", dataset / "labelsTr" / f"{case}.nii.gz"
    if not image.exists():
        return None
    assert label.exists(), f"{image} without its label"
    return read_array(image)[0], read_array(label)[0]


def _pair_nnunet_reads(dataset: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    """The case's image and label as nnU-Net's own file lookup finds them (the folders, or dataset.json's
    listing), after checking that numTraining counts what it finds."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dataset_json = load_json(dataset / "dataset.json")
    cases = get_filenames_of_train_images_and_targets(str(dataset), dataset_json)
    assert len(cases) == dataset_json["numTraining"], f"{dataset.name}: numTraining disagrees with the files"
    assert case in cases, f"{dataset.name}: nnU-Net does not see {case}"
    return read_array(Path(cases[case]["images"][0]))[0], read_array(Path(cases[case]["label"]))[0]


def _is_pair(found: tuple[np.ndarray, np.ndarray], expected: tuple[sitk.Image, sitk.Image]) -> bool:
    ct, label = expected
    return np.array_equal(found[0], sitk.GetArrayViewFromImage(ct)) and \
        np.array_equal(found[1], (sitk.GetArrayViewFromImage(label) != 0).astype(np.uint8))


def test_sigkill_at_every_step_of_a_replace_leaves_the_old_or_the_new_case(tmp_path: Path) -> None:
    """Kill ``export --replace`` before each of its renames, links, fsyncs and folder removals in turn: at every
    kill point nnU-Net's own file lookup finds the case complete, old or new (never absent, never mixed), and the
    old files are never lost; recovery then gives back the old case (killed before the journal) or the complete
    new one with the old files in femurseg/replaced/."""
    template = tmp_path / "Dataset001_Template"
    old, new = small_case(0), small_case(3)
    export_case(*small_case(1), template, "A")
    export_case(*old, template, "S1")
    other = {name: digest for name, digest in tree_hashes(template).items() if "/A" in f"/{name}"}
    old_bytes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (template / "imagesTr" / "S1_0000.nii.gz",
                                                                       template / "labelsTr" / "S1.nii.gz")}
    done = subprocess.run([sys.executable, "-c", STEP_WORKER, str(template), str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert done.returncode == 0, done.stderr
    folders = [Path(line) for line in done.stdout.split()]
    assert len(folders) >= 15, f"only {len(folders) - 1} kill points: {done.stdout}"
    outcomes, mid_replace = [], None
    for folder in folders:
        if mid_replace is None and LISTING_MARKER in load_json(folder / "dataset.json"):
            mid_replace = shutil.copytree(folder, tmp_path / "mid" / folder.name)  # for nnU-Net's verifier below
        before = tree_hashes(folder)
        assert {name: before.get(name) for name in other} == other, f"{folder.name}: case A changed"
        assert old_bytes <= set(before.values()), f"{folder.name}: an old file of S1 is lost"
        pair = _pair_nnunet_reads(folder, "S1")
        assert _is_pair(pair, old) or _is_pair(pair, new), f"{folder.name}: S1 is mixed"
        recover_dataset(folder)
        pair = _pair(folder, "S1")
        assert pair is not None, f"{folder.name}: S1 gone after recovery"
        replaced = list((folder / "femurseg" / "replaced").glob("S1-*"))
        if _is_pair(pair, new):
            outcomes.append("new")
            assert len(replaced) == 1 and {hashlib.sha256(p.read_bytes()).hexdigest()
                                           for p in replaced[0].rglob("*.nii.gz")} == old_bytes
        else:
            assert _is_pair(pair, old), f"{folder.name}: S1 is neither old nor new"
            outcomes.append("old")
            assert not replaced
        assert load_json(folder / "dataset.json")["numTraining"] == 2
        assert load_json(folder / "femurseg" / "S1.json")["case"] == "S1"
        assert not list(folder.glob(f"{STAGING_PREFIX}*")) and not list((folder / "femurseg").glob("recovered"))
    steps = outcomes[:-1]  # the last folder is the one whose recovery was killed too
    assert steps == sorted(steps, reverse=True) and "old" in steps and "new" in steps, steps  # old ... old new ... new
    assert outcomes[-1] == "new"
    assert mid_replace is not None, "no kill point fell while dataset.json listed the cases"
    # nnU-Net agrees, mid-replace too (all 20 would take a minute)
    verify_with_nnunet(folders[steps.index("new") - 1], folders[-1], mid_replace)


def test_force_exports_an_empty_or_a_full_label(tmp_path: Path) -> None:
    dataset = tmp_path / "Dataset108_Forced"
    ct, label = small_case(2)
    for case, mask in (("empty", label * 0), ("full", label * 0 + 1)):
        with pytest.raises(FemurSegError, match="--force"):
            export_case(ct, mask, dataset, case)
        result = export_case(ct, mask, dataset, case, force=True)
        assert_case_matches(result, ct, mask)
