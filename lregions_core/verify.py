"""Checking a batch output folder file by file (``lregions verify OUT [--repair]``).

A rerun of ``lregions edit`` trusts what it finds cheaply: a finished item when its result.json
and every file it names are there (:func:`lregions_core.stages.finished_item`), a cached stage
result when its files are there with the sizes its summary recorded. :func:`verify` decodes
instead: every item's ``result.json`` and each file it names (final image, overlay, edit layer,
input, kept candidates and masks: PNG), its ``metrics.json``, the summaries (``candidates.json``,
``masks.json``) of the regions and masks folders items refer to, and every feature Parquet
file under ``cache/features/``. It also reports index rows with status ok whose item is gone or
unreadable, and result.json files that belong to another item. (A result.json that cannot be
read names nothing: that item's cached files are checked when the next run redoes it.)

:func:`repair` then makes the next run redo exactly the damaged items: it removes their
``result.json`` (so they are not trusted) and every damaged file (so what was cached is computed
again), and nothing else. A damaged ``metrics.json`` or feature file damages no item: the
evaluate stage recomputes an unreadable ``metrics.json``, and a feature file is only read when
an item's regions are computed again.

Memory stays bounded: items are checked one at a time, one image decoded at a time, and only the
verdicts of recently decoded shared files (inputs, summaries) are remembered.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterator

from lregions_core import stages
from lregions_core.index import INDEX, PARTS, RETRY_SUFFIX, read_index, redo_rows
from lregions_core.store import Store

FEATURES = "cache/features"
REMEMBERED = 65536  # verdicts of whole files kept, so a file many items share is decoded once


@dataclasses.dataclass
class Damage:
    """One damaged file (or missing item): its path relative to the output folder, what is
    wrong with it, the items it makes damaged (their result.json is removed on repair), and
    whether the file is there but unreadable (removed on repair) rather than missing."""

    path: str
    problem: str
    items: list[str] = dataclasses.field(default_factory=list)
    unreadable: bool = False


@dataclasses.dataclass
class Verification:
    """What :func:`verify` found: items and files checked, and the damage."""

    items: int = 0
    files: int = 0
    damage: list[Damage] = dataclasses.field(default_factory=list)
    unfinished_run: bool = False  # index parts of a run that did not end are there

    @property
    def damaged_items(self) -> list[str]:
        return list(dict.fromkeys(item for d in self.damage for item in d.items))

    def to_dict(self) -> dict:
        return {"items": self.items, "files": self.files,
                "damaged_items": self.damaged_items, "unfinished_run": self.unfinished_run,
                "damage": [dataclasses.asdict(d) for d in self.damage]}

    def summary(self) -> str:
        if not self.damage:
            return f"all whole: {self.items} items, {self.files} files decoded"
        return (f"{len(self.damage)} damaged: {len(self.damaged_items)} of {self.items} "
                f"items to redo; {self.files} files decoded")


def _reason(exc: BaseException) -> str:
    """A short, one-line reason for a file that could not be read."""
    text = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return detail if len(detail) <= 160 else detail[:157] + "..."


def _decode(store: Store, rel: str) -> None:
    """Read ``rel`` the way the pipeline reads it: PNG decoded whole, JSON parsed, a feature
    Parquet file read into features. Raises what reading raises."""
    if rel.endswith(".png"):
        store.read_png(rel)
    elif rel.endswith(".json"):
        store.read_json(rel)
    elif rel.endswith(".parquet"):
        stages.load_features(store, rel)
    else:  # pragma: no cover - every file verify checks is one of the above
        store.read_bytes(rel)


class _Checker:
    """Decodes files once each and collects the damage (one per :func:`verify` call)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.found = Verification()
        self.damaged: dict[str, Damage] = {}
        self.whole: OrderedDict[str, None] = OrderedDict()

    def damage(self, path: str, problem: str, item: str | None = None,
               unreadable: bool = False) -> None:
        found = self.damaged.get(path)
        if found is None:
            found = self.damaged[path] = Damage(path, problem, unreadable=unreadable)
            self.found.damage.append(found)
        if item is not None and item not in found.items:
            found.items.append(item)

    def check(self, rel: str, item: str | None = None) -> bool:
        """Decode ``rel`` (unless already checked); damage names ``item``. Whether it is whole."""
        if rel in self.damaged:
            self.damage(rel, self.damaged[rel].problem, item)
            return False
        if rel in self.whole:
            self.whole.move_to_end(rel)
            return True
        self.found.files += 1
        try:
            _decode(self.store, rel)
        except FileNotFoundError:
            self.damage(rel, "missing", item)
            return False
        except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, the file is bad
            self.damage(rel, f"cannot read: {_reason(exc)}", item, unreadable=True)
            return False
        self.whole[rel] = None
        if len(self.whole) > REMEMBERED:
            self.whole.popitem(last=False)
        return True


def _index_rows(store: Store, checker: _Checker) -> dict[str, dict]:
    """id -> index record (status, image, prompt), or {} with the damage noted when the index
    cannot be read. Raises FileNotFoundError when there is no index at all."""
    try:
        frame = read_index(store)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged index: still check the item folders
        checker.damage(INDEX, f"cannot read: {_reason(exc)} (the next run writes it again)")
        return {}
    return {str(r["id"]): r for r in frame[["id", "status", "image", "prompt"]].to_dict("records")}




def _check_item(checker: _Checker, item_id: str, row: dict | None, present: bool,
                items: str) -> None:
    store, folder = checker.store, f"{items}/{item_id}"
    listed_ok = row is not None and row["status"] == "ok"
    rel = f"{folder}/result.json"
    if not present:
        if listed_ok:
            checker.damage(folder, "missing (the index lists the item as ok)", item_id)
        return
    if not store.exists(rel):
        if listed_ok:
            checker.damage(rel, "missing (the index lists the item as ok)", item_id)
        return
    checker.found.items += 1
    checker.found.files += 1
    try:
        result = store.read_json(rel)
    except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, the file is bad
        checker.damage(rel, f"cannot read: {_reason(exc)}", item_id, unreadable=True)
        return
    try:
        files = stages.item_files(result, item_id, items)
        summaries = [f"{result['regions_path']}/candidates.json"]
        if result.get("masks_path"):
            summaries.append(f"{result['masks_path']}/masks.json")
        for path in summaries:
            if not path.startswith(("cache/regions/", "cache/masks/")) or ".." in path:
                raise ValueError(f"names the stage folder {path!r}, not one of the caches")
    except stages.OutsideOutputError as exc:
        # Not damage to repair: this folder is inside another output folder (an ablation cell)
        checker.damage(rel, f"{exc}: verify the output folder that holds it", None)
        return
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        checker.damage(rel, f"not an item's result: {_reason(exc)}", item_id, unreadable=True)
        return
    record = result.get("manifest_row") or {}
    if result.get("id") != item_id or record.get("id") != item_id:
        checker.damage(rel, f"belongs to item {result.get('id')!r} (manifest row "
                            f"{record.get('id')!r}), not to folder {item_id!r}", item_id)
    elif listed_ok and (record.get("image"), record.get("prompt")) != (row["image"],
                                                                         row["prompt"]):
        checker.damage(rel, "its manifest row (image, prompt) is not the index row's", item_id)
    for path in files + summaries:
        checker.check(path, item_id)
    if store.exists(f"{folder}/metrics.json"):  # missing: the next run's evaluate writes it
        checker.check(f"{folder}/metrics.json")


def verify(store: Store, items: str = "items") -> Verification:
    """Decode every file of the batch output folder in ``store`` that an item or the index
    relies on (see the module docstring). Raises FileNotFoundError when the folder has no
    index (not a batch output folder)."""
    checker = _Checker(store)
    rows = _index_rows(store, checker)
    folders = [name for name in store.listdir(items) if not name.startswith(".")]
    present = set(folders)
    # index rows in manifest order, then item folders the index does not list
    for item_id in [*rows, *(name for name in folders if name not in rows)]:
        _check_item(checker, item_id, rows.get(item_id), item_id in present, items)
    for name in store.listdir(FEATURES):
        if name.endswith(".parquet") and not name.startswith("."):
            checker.check(f"{FEATURES}/{name}")
    checker.found.unfinished_run = any(name.startswith("run=") for name in store.listdir(PARTS))
    return checker.found


def repair(store: Store, found: Verification, items: str = "items") -> list[str]:
    """Remove the damaged items' ``result.json`` and every damaged file that is there (files
    that cannot be read; a missing one has nothing to remove), so that the next run redoes
    exactly those items and computes those files again. Never the index, and nothing else.
    Parts of an unfinished run that hold a damaged item are marked (``<part>.retry.json``), so
    the run that resumes it redoes them too. Returns what was removed and marked."""
    doomed = [f"{items}/{item}/result.json" for item in found.damaged_items]
    doomed += [d.path for d in found.damage if d.unreadable and d.path != INDEX]
    doomed = [rel for rel in dict.fromkeys(doomed) if _is_file(store, rel)]
    store.remove(doomed)
    # A run left unfinished is resumed by the next run, which skips the rows in its parts:
    # mark the parts holding damaged items, so that resumed run redoes them too.
    return doomed + redo_rows(store, "", found.damaged_items, "repaired")


def _is_file(store: Store, rel: str) -> bool:
    """Whether ``rel`` is a file inside the output folder (never a folder: repair removes files
    only)."""
    try:
        return store.fs.isfile(store.path(rel))
    except (ValueError, OSError):
        return False


def lines(found: Verification, items: str = "items") -> Iterator[str]:
    """The damage, one line per file: ``PATH: PROBLEM``, and the items it damages where the
    path does not name them, then the summary."""
    for d in found.damage:
        named = [item for item in d.items
                 if not f"{d.path}/".startswith(f"{items}/{item}/")]
        suffix = f" (items: {', '.join(named)})" if named else ""
        yield f"{d.path}: {d.problem}{suffix}"
    if found.damage and found.unfinished_run:
        yield (f"note: {PARTS}/ holds the index parts of a run that did not end; a rerun with "
               "the same manifest and settings resumes it, and redoes the damaged rows in its "
               "parts only after --repair")
    yield found.summary()


def repair_lines(removed: list[str]) -> Iterator[str]:
    for rel in removed:
        if rel.endswith(RETRY_SUFFIX):
            yield f"marked {rel}: a resumed run redoes the damaged rows of that part"
        else:
            yield f"removed {rel}"
    files = [rel for rel in removed if not rel.endswith(RETRY_SUFFIX)]
    yield (f"removed {len(files)} files: the next `lregions edit` with the same manifest and "
           "settings redoes the damaged items" if removed else "nothing to remove")

