"""The epoch x strength grid: which saved step, at which strength? Rows are a run's saved files, columns strengths.

Host-agnostic: whoever generates for the user renders each cell (``Renderer``): the WebUI's own
``process_images`` with ``<lora:file:w>`` in the prompt, or the CLI's diffusers model with the LoRA applied. This
module finds the rows, renders the cells it does not have yet (each cell is a PNG in ``<name>-grid/cells`` named
by what it shows, so a stopped grid resumes where it stopped and an unchanged cell is never drawn twice), lays
them out with labels and writes the grid PNG with its infotext, and maps a click on it back to a cell.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from lora_train.engine.files import atomic_write, atomic_write_text

DEFAULT_STRENGTHS = (0.4, 0.6, 0.8, 1.0, 1.2)
_STEP_FILE = r"-step(\d{8})"  # ours: <name>-step00000020.safetensors
_EPOCH_FILE = r"-(\d{6})"  # kohya's: <name>-000004.safetensors


@dataclass(frozen=True)
class GridRow:
    """One saved LoRA file of the run, labelled by its step and epoch (from its kohya metadata)."""

    label: str
    path: str
    step: int


@dataclass
class GridSpec:
    """Everything that decides the grid's pixels. Column 0 is always the plain image (strength 0)."""

    name: str
    rows: list[GridRow]
    prompts: list[str]
    strengths: list[float] = field(default_factory=lambda: list(DEFAULT_STRENGTHS))
    negative: str = ""
    seed: int = 42
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler: str = "Euler"  # the WebUI's sampler name; the CLI's diffusers model samples with DDIM

    @property
    def columns(self) -> list[float]:
        return [0.0, *self.strengths]

    def cell_count(self) -> int:
        """Images to render: the plain column once per prompt, every LoRA cell once."""
        return len(self.prompts) * (1 + len(self.rows) * len(self.strengths))


# (row or None for the plain image, strength, prompt) -> (image, infotext)
Renderer = Callable[[GridRow | None, float, str], tuple[Image.Image, str]]


@dataclass
class GridResult:
    """The grid PNGs (one per prompt), where the cells are, and whether it was stopped before the end."""

    images: list[Path]
    spec: GridSpec
    rendered: int
    reused: int
    stopped: bool = False
    infotext: str = ""


def saved_step_files(final: Path, folders: list[Path] = ()) -> list[Path]:
    """The run's saved files (file names only, nothing read): ``<name>-stepNNNNNNNN`` (ours) and kohya's
    ``<name>-NNNNNN`` (epochs) beside ``final`` or in ``folders`` (the run folder)."""
    pattern = re.compile(rf"{re.escape(final.stem)}(?:{_STEP_FILE}|{_EPOCH_FILE})\.safetensors")
    found: dict[str, Path] = {}
    for folder in dict.fromkeys([final.parent, *map(Path, folders)]):
        if folder.is_dir():
            for entry in sorted(folder.iterdir()):
                if pattern.fullmatch(entry.name):
                    found.setdefault(entry.name, entry)
    return list(found.values())


def find_rows(final: Path, folders: list[Path] = ()) -> list[GridRow]:
    """The saved files in step order, the final file last, labelled by step and epoch from their metadata."""
    from lora_train.engine.output.export import read_lora_metadata

    rows = []
    found = saved_step_files(final, folders)
    for path in [*found, final] if final.is_file() else found:
        meta = read_lora_metadata(path)
        step = int(meta.get("ss_steps", 0) or 0)
        epoch = meta.get("ss_epoch")
        label = f"step {step}" + (f" · epoch {epoch}" if epoch else "")
        rows.append(GridRow(label + (" (final)" if path == final else ""), str(path), step))
    return sorted(rows, key=lambda row: (row.step, row.path == str(final)))


def cells_dir(folder: Path, name: str) -> Path:
    return folder / f"{name}-grid" / "cells"


def _cell_key(spec: GridSpec, row: GridRow | None, strength: float, prompt: str) -> str:
    """What the cell shows: the LoRA file (path, size, mtime), strength, prompt and every sampling setting."""
    lora = ""
    if row is not None:
        stat = Path(row.path).stat()
        lora = f"{Path(row.path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    text = json.dumps([lora, strength, prompt, spec.negative, spec.seed, spec.steps, spec.cfg_scale, spec.width,
                       spec.height, spec.sampler])
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def render(spec: GridSpec, folder: Path, renderer: Renderer, should_stop: Callable[[], bool] = lambda: False,
           on_cell: Callable[[int, int], None] = lambda done, total: None) -> GridResult:
    """Render the missing cells (plain column first), then lay out and save one grid PNG per prompt in ``folder``.

    A stop leaves every finished cell in place; rendering the same spec again continues from there.
    """
    cells = cells_dir(folder, spec.name)
    cells.mkdir(parents=True, exist_ok=True)
    total, done, rendered = spec.cell_count(), 0, 0
    grids: list[list[list[Path]]] = []
    infotexts: list[str] = []  # per prompt: its first LoRA cell's, as the WebUI wrote it
    for prompt in spec.prompts:
        infotext = ""
        plan = [(None, 0.0)] + [(row, w) for row in spec.rows for w in spec.strengths]
        paths: dict[tuple[str | None, float], Path] = {}
        for row, strength in plan:
            path = cells / f"{_cell_key(spec, row, strength, prompt)}.png"
            if not path.is_file():
                if should_stop():
                    return GridResult([], spec, rendered, done - rendered, stopped=True)
                image, text = renderer(row, strength, prompt)
                _save_png(path, image, text)
                rendered += 1
            if row is not None and not infotext:
                infotext = _read_infotext(path)
            paths[(row.path if row else None, strength)] = path
            done += 1
            on_cell(done, total)
        grids.append([[paths[(None, 0.0)], *(paths[(row.path, w)] for w in spec.strengths)] for row in spec.rows])
        infotexts.append(infotext)
    images = []
    for index, (prompt, grid, infotext) in enumerate(zip(spec.prompts, grids, infotexts, strict=True)):
        out = folder / f"{spec.name}-grid{'' if len(spec.prompts) == 1 else f'-{index + 1}'}.png"
        sheet = compose(spec, prompt, grid)
        text = f"{infotext}\nLoRA grid: {spec.name}; rows {', '.join(r.label for r in spec.rows)}; strengths " \
               f"0 (plain), {', '.join(f'{w:g}' for w in spec.strengths)}"
        images.append(_save_png(out, sheet, text))
    atomic_write_text(folder / f"{spec.name}-grid" / "grid.json", json.dumps(asdict(spec), indent=1))
    return GridResult(images, spec, rendered, total - rendered, infotext=infotexts[0] if infotexts else "")


@dataclass(frozen=True)
class Layout:
    """Where the cells sit in a grid image: a left label column and a header row of strengths."""

    left: int
    top: int
    width: int
    height: int

    def cell_at(self, x: float, y: float) -> tuple[int, int] | None:
        """(row, column) under a click at pixel (x, y), or None for the labels."""
        if x < self.left or y < self.top:
            return None
        return int((y - self.top) // self.height), int((x - self.left) // self.width)


def layout(spec: GridSpec) -> Layout:
    return Layout(left=max(96, spec.width // 2), top=max(40, spec.height // 6), width=spec.width, height=spec.height)


def compose(spec: GridSpec, prompt: str, grid: list[list[Path]]) -> Image.Image:
    """The labelled sheet: strengths across (``plain`` first), the saved steps down, the prompt on top."""
    box = layout(spec)
    columns = spec.columns
    sheet = Image.new("RGB", (box.left + box.width * len(columns), box.top + box.height * len(grid)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((4, 2), prompt[:80], fill="black", font=font)
    for col, strength in enumerate(columns):
        draw.text((box.left + col * box.width + 4, box.top - 14), "plain" if col == 0 else f"{strength:g}",
                  fill="black", font=font)
    for row_index, (row, cells) in enumerate(zip(spec.rows, grid, strict=True)):
        y = box.top + row_index * box.height
        for line, text in enumerate(_wrap(row.label, 14)):
            draw.text((4, y + 4 + 12 * line), text, fill="black", font=font)
        for col, path in enumerate(cells):
            with Image.open(path) as cell:
                sheet.paste(cell.convert("RGB").resize((box.width, box.height)), (box.left + col * box.width, y))
    return sheet


def _wrap(text: str, width: int) -> list[str]:
    words, lines = text.split(), [""]
    for word in words:
        if lines[-1] and len(lines[-1]) + 1 + len(word) > width:
            lines.append(word)
        else:
            lines[-1] = f"{lines[-1]} {word}".strip()
    return lines


def _save_png(path: Path, image: Image.Image, infotext: str) -> Path:
    """PNG with the infotext where the WebUI's PNG Info reads it (the ``parameters`` text chunk)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def _read_infotext(path: Path) -> str:
    with Image.open(path) as image:
        return image.info.get("parameters", "")


def cell_choice(spec: GridSpec, row: int, column: int) -> tuple[GridRow, float] | None:
    """The saved file and strength of a clicked cell (None for the plain column or outside the grid)."""
    if not (0 <= row < len(spec.rows) and 1 <= column < len(spec.columns)):
        return None
    return spec.rows[row], spec.columns[column]


def load_spec(folder: Path, name: str) -> GridSpec | None:
    """The spec of the last grid written for ``name`` in ``folder`` (what a click on its PNG refers to)."""
    path = folder / f"{name}-grid" / "grid.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    data["rows"] = [GridRow(**row) for row in data["rows"]]
    return GridSpec(**data)
