"""The FemurSeg panel: open a CT, segment, fill, compare, export, improve the model. Widgets only; the actions live in workflow.py.

Buttons that act on typed values send those values with the click (``trigger(name, [values])``): a click can
reach the server before the last keystrokes' state updates, and must act on what the user sees. Every widget that a browser test drives carries a stable ``id`` (``fs-...``), so tests do not depend on
Vuetify's generated markup.
"""

from __future__ import annotations

from collections.abc import Callable

from trame.widgets import html
from trame.widgets.vuetify3 import (
    VAlert,
    VBtn,
    VCard,
    VCardText,
    VCardTitle,
    VDivider,
    VFileInput,
    VProgressLinear,
    VRadio,
    VRadioGroup,
    VSelect,
    VTable,
    VTextField,
)

METRIC_ROWS = (("dice", "Dice"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"),
               ("asd_mm", "Average surface distance (mm)"), ("hd95_mm", "95% Hausdorff distance (mm)"),
               ("volume_ml_reference", "Volume nnU-Net (ml)"), ("volume_ml_other", "Volume fill (ml)"))


def _upload_js(kind: str) -> str:
    """Client code for a file input: refuse oversized files without reading them, else send the file."""
    return (
        "(event) => { const f = event.target.files && event.target.files[0]; if (!f) return; "
        f"if (f.size > fs_max_upload) {{ trigger('fs_upload_refused', [f.name, f.size, '{kind}']); }} "
        f"else {{ fs_uploading = true; trigger('fs_upload', [f, '{kind}']); }} }}"
    )


class FemurSegPanel(html.Div):
    """The drawer content of the FemurSeg tab."""

    def __init__(self, actions: dict[str, Callable], **kwargs) -> None:
        super().__init__(classes="pa-2", **kwargs)
        with self:
            VAlert(
                v_if=("fs_message",),
                id="fs-message",
                type=("fs_message_type",),
                text=("fs_message",),
                density="compact",
                variant="flat",  # opaque: it stays in sight over the panel while that scrolls
                classes="mb-2",
                style="position: sticky; top: 0; z-index: 2;",
                closable=True,
                click_close="fs_message = ''",
            )
            self._open_card(actions)
            self._segment_card(actions)
            self._compare_card()
            self._export_card(actions)
            self._improve_card(actions)

    @staticmethod
    def _open_card(actions: dict[str, Callable]) -> None:
        with VCard(variant="flat"):
            VCardTitle("1. CT", classes="text-subtitle-1")
            with VCardText():
                html.Div("{{ fs_ct_name ? 'Loaded: ' + fs_ct_name : 'No CT loaded' }}", id="fs-ct-name",
                         classes="text-body-2 mb-2")
                VBtn("Load sample", id="fs-load-sample", click=actions["load_sample"], disabled=("fs_busy",),
                     size="small", variant="tonal", classes="mr-2 mb-2")
                VFileInput(label="Upload CT (.nrrd, .nii.gz, .mha)", id="fs-upload-ct", density="compact",
                           disabled=("fs_busy || fs_uploading",), change=_upload_js("ct"), hide_details=True,
                           classes="mb-2")
                VFileInput(label="Upload fill label (same grid as the CT)", id="fs-upload-fill", density="compact",
                           disabled=("fs_busy || fs_uploading || !fs_ct_name",), change=_upload_js("fill"),
                           hide_details=True, classes="mb-2")
                VTextField(v_model=("fs_path", ""), id="fs-path", label="Path on the server", density="compact",
                           hide_details=True, hint="inside the allowed folders", classes="mb-2")
                VBtn("Open CT", id="fs-open-path", click="trigger('fs_open_path', [fs_path])", disabled=("fs_busy",), size="small",
                     variant="tonal", classes="mr-2")
                VBtn("Load fill", id="fs-load-fill-path", click="trigger('fs_load_fill_path', [fs_path])",
                     disabled=("fs_busy || !fs_ct_name",), size="small", variant="tonal")
                html.Div("Allowed folders: {{ fs_open_roots }}", classes="text-caption mt-1")

    @staticmethod
    def _segment_card(actions: dict[str, Callable]) -> None:
        VDivider()
        with VCard(variant="flat"):
            VCardTitle("2. Segment", classes="text-subtitle-1")
            with VCardText():
                VSelect(v_model=("fs_model", ""), items=("fs_model_items", []), id="fs-model", label="Model",
                        density="compact", hide_details=True, disabled=("fs_segmenting",), classes="mb-2")
                VBtn("Segment", id="fs-segment", click=actions["segment"], color="primary", size="small",
                     disabled=("fs_busy || fs_segmenting || !fs_ct_name",), classes="mr-2")
                VBtn("Cancel", id="fs-cancel", click=actions["cancel"], size="small", variant="tonal",
                     disabled=("!fs_segmenting",), classes="mr-2")
                VBtn("Compute fill", id="fs-compute-fill", click=actions["compute_fill"], size="small",
                     variant="tonal", disabled=("fs_busy || !fs_ct_name",))
                VProgressLinear(v_if=("fs_segmenting",), id="fs-progress", model_value=("fs_progress",),
                                height=14, color="primary", classes="mt-2")
                html.Div("{{ fs_stage }}", v_if=("fs_segmenting",), classes="text-caption")

    @staticmethod
    def _compare_card() -> None:
        VDivider()
        with VCard(variant="flat", v_if=("fs_metrics.length",)):
            VCardTitle("3. nnU-Net vs fill", classes="text-subtitle-1")
            with VCardText():
                with VTable(density="compact", id="fs-metrics"):
                    with html.Thead(), html.Tr():
                        html.Th("metric")
                        html.Th("fill vs nnU-Net")
                    with html.Tbody(), html.Tr(v_for="row in fs_metrics", key="row.metric"):
                        html.Td("{{ row.metric }}")
                        html.Td("{{ row.value }}")
                html.Div("{{ fs_worst_slice }}", classes="text-caption mt-1")

    @staticmethod
    def _export_card(actions: dict[str, Callable]) -> None:
        VDivider()
        with VCard(variant="flat"):
            VCardTitle("4. Correct and export to a training dataset", classes="text-subtitle-1")
            with VCardText():
                VSelect(v_model=("fs_target_segment", ""), items=("fs_segment_items", []), id="fs-target-segment",
                        label="Segment to correct and export", density="compact", hide_details=True,
                        hint="the Segment Editor tools (left bar, Segment Editor tab) act on it", classes="mb-2")
                VTextField(v_model=("fs_dataset", "Dataset101_FemurCorrected"), id="fs-dataset",
                           label="Dataset folder", density="compact", hide_details=True, classes="mb-2")
                VTextField(v_model=("fs_case", "case001"), id="fs-case", label="Case name", density="compact",
                           hide_details=True, classes="mb-2")
                with VRadioGroup(v_model=("fs_split", "train"), inline=True, density="compact", hide_details=True):
                    VRadio(label="train", value="train", id="fs-split-train")
                    VRadio(label="test", value="test", id="fs-split-test")
                VBtn("Export", id="fs-export", click="trigger('fs_export', [fs_dataset, fs_case, fs_split, fs_target_segment])", color="primary", size="small",
                     disabled=("fs_busy || !fs_ct_name",))
                with html.Div(classes="d-flex align-center mt-2"):
                    VSelect(v_model=("fs_surface_format", "stl"), items=("['stl', 'vtk', 'vtp', 'obj']",),
                            id="fs-surface-format", label="Surface", density="compact", hide_details=True,
                            style="max-width: 110px;", classes="mr-2")
                    VBtn("Export surface", id="fs-export-surface", size="small", variant="tonal",
                         click="trigger('fs_export_surface', [fs_case, fs_surface_format, fs_target_segment])",
                         disabled=("fs_busy || !fs_ct_name",))
                html.Div("Datasets root: {{ fs_datasets_root }}", classes="text-caption mt-1")

    @staticmethod
    def _improve_card(actions: dict[str, Callable]) -> None:
        VDivider()
        with VCard(variant="flat"):
            VCardTitle("5. Improve the model", classes="text-subtitle-1")
            with VCardText():
                html.Div("Fine-tunes the model chosen above on a dataset's training cases, measures it on the test "
                         "cases before and after, and adds the new model to the list.", classes="text-caption mb-2")
                VTextField(v_model=("fs_ft_dataset", "Dataset101_FemurCorrected"), id="fs-ft-dataset",
                           label="Dataset folder (the one Export writes to)", density="compact", hide_details=True,
                           classes="mb-2")
                VTextField(v_model=("fs_ft_minutes", "30"), id="fs-ft-minutes", label="Time budget (minutes)",
                           type="number", density="compact", hide_details=True, classes="mb-2")
                VBtn("Start", id="fs-ft-start", color="primary", size="small", disabled=("fs_ft_running",),
                     click="trigger('fs_finetune', [fs_ft_dataset, fs_ft_minutes, fs_model])", classes="mr-2")
                VBtn("Cancel", id="fs-ft-cancel", click=actions["cancel_finetune"], size="small", variant="tonal",
                     disabled=("!fs_ft_running",))
                VProgressLinear(v_if=("fs_ft_running",), id="fs-ft-progress", model_value=("fs_ft_progress",),
                                height=14, color="primary", classes="mt-2")
                html.Div("{{ fs_ft_stage }}", v_if=("fs_ft_running",), classes="text-caption")
                html.Div("{{ fs_ft_result }}", v_if=("fs_ft_result",), id="fs-ft-result", classes="text-body-2 mt-1")
