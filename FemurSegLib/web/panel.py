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
    VCheckbox,
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

from .fe import FEModelCard

# Messages wrap instead of running off the panel; disabled controls look disabled (Vuetify's tonal buttons barely
# change); the drawer's cards stay clear of the sticky message.
PAGE_CSS = """
#fs-message .v-alert__content { white-space: normal; overflow-wrap: anywhere; }
.v-btn--disabled, .v-input--disabled, .v-selection-control--disabled { opacity: 0.38 !important; filter: grayscale(1); }
#fs-metrics td, #fs-metrics th { padding: 0 4px !important; font-size: 12px; white-space: nowrap; }
"""


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
            html.Style(PAGE_CSS)
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
            FEModelCard.card()
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
        with VCard(variant="flat"):
            VCardTitle("3. Compare", classes="text-subtitle-1")
            with VCardText():
                html.Div(v_html=("fs_legend",), id="fs-legend", classes="text-caption mb-2")
                with html.Div(classes="mb-2"):
                    VBtn("Bone window", id="fs-window-bone", click="trigger('fs_window', ['bone'])", size="small",
                         variant="tonal", disabled=("!fs_ct_name",), classes="mr-2")
                    VBtn("Soft-tissue window", id="fs-window-soft", click="trigger('fs_window', ['soft tissue'])",
                         size="small", variant="tonal", disabled=("!fs_ct_name",))
                html.Div("Segment and Compute fill to compare them.", v_if=("!fs_rows.length",),
                         classes="text-caption")
                with html.Div(v_if=("fs_rows.length",)):
                    html.Div("{{ fs_comparison_title }}", id="fs-comparison-title", classes="text-body-2")
                    with VTable(density="compact", id="fs-metrics"):
                        with html.Thead(), html.Tr():
                            html.Th("{{ column }}", v_for="column in fs_columns", key="column")
                        with html.Tbody(), html.Tr(v_for="row in fs_rows", key="row[0]"):
                            html.Td("{{ cell }}", v_for="(cell, i) in row", key="i")
                    VAlert(v_if=("fs_comparison_warning",), id="fs-comparison-warning", type="warning",
                           density="compact", variant="tonal", text=("fs_comparison_warning",), classes="mt-1")
                    VBtn("Jump to worst slice", id="fs-jump-worst", click="trigger('fs_jump', [0])", size="small",
                         variant="tonal", disabled=("!fs_worst_places.length",), classes="mt-2")
                    with html.Ol(id="fs-worst-places", classes="text-caption ml-4 mt-1"):
                        with html.Li(v_for="place in fs_worst_places", key="place.index"):
                            VBtn("{{ place.title }}", variant="text", size="x-small", density="compact",
                                 click="trigger('fs_jump', [place.index])")

    @staticmethod
    def _export_card(actions: dict[str, Callable]) -> None:
        VDivider()
        with VCard(variant="flat"):
            VCardTitle("4. Correct and export to a training dataset", classes="text-subtitle-1")
            with VCardText():
                VSelect(v_model=("fs_target_segment", ""), items=("fs_segment_items", []), id="fs-target-segment",
                        label="Segment to correct (the Segment Editor tools act on it)", density="compact",
                        hide_details=True, classes="mb-2")
                VSelect(v_model=("fs_export_target",), items=("fs_export_items", []), id="fs-export-target",
                        label="Export", density="compact", hide_details=True, classes="mb-1")
                html.Div("{{ fs_export_preview }}", id="fs-export-preview", classes="text-caption mb-2")
                VTextField(v_model=("fs_dataset", "Dataset101_FemurCorrected"), id="fs-dataset",
                           label="Dataset folder", density="compact", hide_details=True, classes="mb-2")
                VTextField(v_model=("fs_case",), id="fs-case", label="Case name (from the CT's file name)",
                           density="compact", hide_details=True, classes="mb-2")
                with VRadioGroup(v_model=("fs_split", "train"), inline=True, density="compact", hide_details=True):
                    VRadio(label="train", value="train", id="fs-split-train")
                    VRadio(label="test", value="test", id="fs-split-test")
                VCheckbox(v_model=("fs_replace",), id="fs-replace", density="compact", hide_details=True,
                          label="Replace a case or surface of that name (the old case is kept in femurseg/replaced/)")
                VBtn("Export", id="fs-export", color="primary", size="small", disabled=("fs_busy || !fs_ct_name",),
                     click="trigger('fs_export', [fs_dataset, fs_case, fs_split, fs_export_target, fs_replace])")
                with html.Div(classes="d-flex align-center mt-2"):
                    VSelect(v_model=("fs_surface_format", "stl"), items=("['stl', 'vtk', 'vtp', 'obj']",),
                            id="fs-surface-format", label="Surface", density="compact", hide_details=True,
                            style="max-width: 110px;", classes="mr-2")
                    VBtn("Export surface", id="fs-export-surface", size="small", variant="tonal",
                         click="trigger('fs_export_surface', [fs_case, fs_surface_format, fs_export_target, "
                               "fs_replace])",
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
