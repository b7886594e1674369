"""Convert ADE20K to openseed shards: ADE20K-150 semantic, instance and panoptic (SceneParsing release or the files
Mask2Former's preparation scripts write), and ADE20K-full (847 classes, semantic).

    python -m data_prep.ade20k root=/data/ADEChallengeData2016 split=validation kind=panoptic \
        out=data/benchmarks/ade20k_panoptic_val
    python -m data_prep.ade20k root=/data/ADEChallengeData2016 split=validation kind=instance \
        out=data/benchmarks/ade20k_instance_val
    python -m data_prep.ade20k root=/data/ADEChallengeData2016 split=validation kind=semantic \
        out=data/benchmarks/ade20k_semantic_val
    python -m data_prep.ade20k root=/data/ADE20K_2021_17_01 split=validation kind=full \
        out=data/benchmarks/ade20k_full_val

Kinds (``root`` is ``ADEChallengeData2016``, or for ``full`` ``ADE20K_2021_17_01``; a folder holding it works too):

- ``semantic`` (task "sem", 150 classes): ``annotations/<split>/ADE_*.png`` (8-bit, 0 = "other" = void, 1..150 =
  class), or with ``layout=detectron2`` ``annotations_detectron2/<split>/*.png`` (prepare_ade20k_sem_seg.py: the
  value minus one, 0..149, 255 = void).
- ``instance`` (task "det", RLE masks, the 100 thing classes): ``annotations_instance/<split>/ADE_*.png`` (the
  instance challenge's PNGs: R = instance class 1..100, G = instance index, 0 = none), one object per non-zero G,
  or with ``layout=detectron2`` the COCO file ``ade20k_instance_<train|val>.json`` (prepare_ade20k_ins_seg.py).
- ``panoptic`` (task "seg", 150 classes, 100 things): as prepare_ade20k_pan_seg.py combines them: stuff segments from
  the semantic map (one per stuff class), then every instance of the instance map pasted over them; pixels of a thing
  class without an instance are void. Segment ids: ``class + 1`` for stuff, ``1000 * (class + 1) + G`` for things.
  With ``layout=detectron2``: ``ade20k_panoptic_<train|val>.json`` and ``ade20k_panoptic_<train|val>/`` (PNG kept as
  written).
- ``full`` (task "sem", 847 classes): prepare_ade20k_full_sem_seg.py's ``images_detectron2/<split>/*.jpg`` and
  ``annotations_detectron2/<split>/*.tif`` (16-bit TIFF, class 0..846, 65535 = void); the stored label map is 16-bit.

``layout=auto`` (the default) reads the release files when their folders are there, else the detectron2 / COCO-style
files. Category ids are the 0-based ADE20K-150 class indices (the ids of Mask2Former's files: ``wall`` = 0, ...,
``flag`` = 149; the instance vocabulary keeps the ids of its 100 things), or the 0..846 class index for ``full``.
The instance class -> 150-class map is Mask2Former's ``datasets/ade20k_instance_catid_mapping.txt``. Names are the
ones the reference OpenSeeD prompts ADE with (``utils/constants.py``: ``ADE_PANOPTIC_CLASSES``, ``ADE20K_847``).
Image ids: the number in ``ADE_<train|val>_<N>.jpg``; when some file names hold no number or two share one (ADE20K-full
mixes ``ADE_train_*`` and ``ADE_frame_*``), the index in sorted file order for every image. ``split`` is
``training`` or ``validation`` (``train`` / ``val`` too); ``name`` defaults to ``ade20k_<kind>_<train|val>``.
``--help`` lists every key.
"""

from __future__ import annotations

import re
import sys
from functools import partial
from pathlib import Path

import numpy as np

from data_prep._cli import converter_options, run
from data_prep.layout import encode_instance_map, image_size, panoptic_annotations, read_array
from data_prep.shard_writer import (
    ConversionSummary,
    Encoded,
    IdMap,
    Unreadable,
    encode_detection,
    encode_panoptic,
    encode_semantic,
    read_coco_panoptic,
    write_shards,
)
from openseed.cli import Option, one_of, path
from openseed.core.vocabulary import Vocabulary
from openseed.data.coco import DataError, ImageRecord, ReadReport, load_coco_detection, load_json
from openseed.data.shards import VOID

#: The 150 ADE20K-150 (SceneParsing) class names as the reference OpenSeeD prompts them (``utils/constants.py``
#: ``ADE_PANOPTIC_CLASSES``), in class order: index i is the class of label value i + 1 in ``annotations/*.png``.
ADE150_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'window', 'grass', 'cabinet', 'sidewalk',
    'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water', 'painting', 'sofa',
    'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp',
    'tub', 'rail', 'cushion', 'base', 'box', 'column', 'signboard', 'chest of drawers', 'counter', 'sand', 'sink',
    'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs', 'runway', 'case', 'pool table', 'pillow',
    'screen door', 'stairway', 'river', 'bridge', 'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book',
    'hill', 'bench', 'countertop', 'stove', 'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar',
    'arcade machine', 'hovel', 'bus', 'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'street lamp',
    'booth', 'tv', 'plane', 'dirt track', 'clothes', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle',
    'buffet', 'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything', 'pool',
    'stool', 'barrel', 'basket', 'falls', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank',
    'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture',
    'hood', 'sconce', 'vase', 'traffic light', 'tray', 'trash can', 'fan', 'pier', 'crt screen', 'plate', 'monitor',
    'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag',
)

#: The 150-class label value (1-based) of each instance class 1..100 of ``annotations_instance/*.png`` (R channel):
#: Mask2Former's ``datasets/ade20k_instance_catid_mapping.txt`` (columns Instance100 -> SceneParse150). These 100
#: classes are the things of ADE20K-150 panoptic; the other 50 are stuff.
INSTANCE_TO_SEMANTIC = (
    8, 9, 11, 13, 15, 16, 19, 20, 21, 23, 24, 25, 28, 31, 32, 33, 34, 36, 37, 38, 39, 40, 42, 43, 44, 45, 46, 48, 50,
    51, 54, 56, 57, 58, 59, 63, 65, 66, 67, 68, 70, 71, 72, 73, 74, 75, 76, 77, 79, 81, 82, 83, 84, 86, 87, 88, 89, 90,
    91, 93, 94, 96, 98, 99, 103, 104, 105, 108, 109, 111, 112, 113, 116, 117, 119, 120, 121, 122, 124, 125, 126, 127,
    128, 130, 131, 133, 134, 135, 136, 137, 138, 139, 140, 143, 144, 145, 147, 148, 149, 150,
)

#: The 847 ADE20K-full class names as the reference OpenSeeD prompts them (``utils/constants.py`` ``ADE20K_847``), in
#: class order: index i is the value i of ``annotations_detectron2/*.tif`` (Mask2Former's ``register_ade20k_full.py``
#: ``trainId``). Some names repeat (two classes share a first synonym); their ids stay distinct.
ADE847_CLASSES = (
    'wall', 'building', 'sky', 'tree', 'road', 'floor', 'ceiling', 'bed', 'sidewalk', 'earth', 'cabinet', 'person',
    'grass', 'windowpane', 'car', 'mountain', 'plant', 'table', 'chair', 'curtain', 'door', 'sofa', 'sea', 'painting',
    'water', 'mirror', 'house', 'rug', 'shelf', 'armchair', 'fence', 'field', 'lamp', 'rock', 'seat', 'river', 'desk',
    'bathtub', 'railing', 'signboard', 'cushion', 'path', 'work surface', 'stairs', 'column', 'sink', 'wardrobe',
    'snow', 'refrigerator', 'base', 'bridge', 'blind', 'runway', 'cliff', 'sand', 'fireplace', 'pillow', 'screen door',
    'toilet', 'skyscraper', 'grandstand', 'box', 'pool table', 'palm', 'double door', 'coffee table', 'counter',
    'countertop', 'chest of drawers', 'kitchen island', 'boat', 'waterfall', 'stove', 'flower', 'bookcase', 'controls',
    'book', 'stairway', 'streetlight', 'computer', 'bus', 'swivel chair', 'light', 'bench', 'case', 'towel', 'fountain',
    'embankment', 'television receiver', 'van', 'hill', 'awning', 'poster', 'truck', 'airplane', 'pole', 'tower',
    'court', 'ball', 'aircraft carrier', 'buffet', 'hovel', 'apparel', 'minibike', 'animal', 'chandelier', 'step',
    'booth', 'bicycle', 'doorframe', 'sconce', 'pond', 'trade name', 'bannister', 'bag', 'traffic light', 'gazebo',
    'escalator', 'land', 'board', 'arcade machine', 'eiderdown', 'bar', 'stall', 'playground', 'ship', 'ottoman',
    'ashcan', 'bottle', 'cradle', 'pot', 'conveyer belt', 'train', 'stool', 'lake', 'tank', 'ice', 'basket', 'manhole',
    'tent', 'canopy', 'microwave', 'barrel', 'dirt track', 'beam', 'dishwasher', 'plate', 'screen', 'ruins', 'washer',
    'blanket', 'plaything', 'food', 'screen', 'oven', 'stage', 'beacon', 'umbrella', 'sculpture', 'aqueduct',
    'container', 'scaffolding', 'hood', 'curb', 'roller coaster', 'horse', 'catwalk', 'glass', 'vase',
    'central reservation', 'carousel', 'radiator', 'closet', 'machine', 'pier', 'fan', 'inflatable bounce game',
    'pitch', 'paper', 'arcade', 'hot tub', 'helicopter', 'tray', 'partition', 'vineyard', 'bowl', 'bullring', 'flag',
    'pot', 'footbridge', 'shower', 'bag', 'bulletin board', 'confessional booth', 'trunk', 'forest', 'elevator door',
    'laptop', 'instrument panel', 'bucket', 'tapestry', 'platform', 'jacket', 'gate', 'monitor', 'telephone booth',
    'spotlight', 'ring', 'control panel', 'blackboard', 'air conditioner', 'chest', 'clock', 'sand dune', 'pipe',
    'vault', 'table football', 'cannon', 'swimming pool', 'fluorescent', 'statue', 'loudspeaker', 'exhibitor', 'ladder',
    'carport', 'dam', 'pulpit', 'skylight', 'water tower', 'grill', 'display board', 'pane', 'rubbish', 'ice rink',
    'fruit', 'patio', 'vending machine', 'telephone', 'net', 'backpack', 'jar', 'track', 'magazine', 'shutter', 'roof',
    'banner', 'landfill', 'post', 'altarpiece', 'hat', 'arch', 'table game', 'bag', 'document', 'dome', 'pier',
    'shanties', 'forecourt', 'crane', 'dog', 'piano', 'drawing', 'cabin', 'ad', 'amphitheater', 'monument', 'henhouse',
    'cockpit', 'heater', 'windmill', 'pool', 'elevator', 'decoration', 'labyrinth', 'text', 'printer', 'mezzanine',
    'mattress', 'straw', 'stalls', 'patio', 'billboard', 'bus stop', 'trouser', 'console table', 'rack', 'notebook',
    'shrine', 'pantry', 'cart', 'steam shovel', 'porch', 'postbox', 'figurine', 'recycling bin', 'folding screen',
    'telescope', 'deck chair', 'kennel', 'coffee maker', 'altar', 'fish', 'easel', 'artificial golf green', 'iceberg',
    'candlestick', 'shower stall', 'television stand', 'wall socket', 'skeleton', 'grand piano', 'candy', 'grille door',
    'pedestal', 'jersey', 'shoe', 'gravestone', 'shanty', 'structure', 'rocking chair', 'bird', 'place mat', 'tomb',
    'big top', 'gas pump', 'lockers', 'cage', 'finger', 'bleachers', 'ferris wheel', 'hairdresser chair', 'mat',
    'stands', 'aquarium', 'streetcar', 'napkin', 'dummy', 'booklet', 'sand trap', 'shop', 'table cloth',
    'service station', 'coffin', 'drawer', 'cages', 'slot machine', 'balcony', 'volleyball court', 'table tennis',
    'control table', 'shirt', 'merchandise', 'railway', 'parterre', 'chimney', 'can', 'tanks', 'fabric', 'alga',
    'system', 'map', 'greenhouse', 'mug', 'barbecue', 'trailer', 'toilet tissue', 'organ', 'dishrag', 'island',
    'keyboard', 'trench', 'basket', 'steering wheel', 'pitcher', 'goal', 'bread', 'beds', 'wood', 'file cabinet',
    'newspaper', 'motorboat', 'rope', 'guitar', 'rubble', 'scarf', 'barrels', 'cap', 'leaves', 'control tower',
    'dashboard', 'bandstand', 'lectern', 'switch', 'baseboard', 'shower room', 'smoke', 'faucet', 'bulldozer',
    'saucepan', 'shops', 'meter', 'crevasse', 'gear', 'candelabrum', 'sofa bed', 'tunnel', 'pallet', 'wire', 'kettle',
    'bidet', 'baby buggy', 'music stand', 'pipe', 'cup', 'parking meter', 'ice hockey rink', 'shelter', 'weeds',
    'temple', 'patty', 'ski slope', 'panel', 'wallet', 'wheel', 'towel rack', 'roundabout', 'canister', 'rod',
    'soap dispenser', 'bell', 'canvas', 'box office', 'teacup', 'trellis', 'workbench', 'valley', 'toaster', 'knife',
    'podium', 'ramp', 'tumble dryer', 'fireplug', 'gym shoe', 'lab bench', 'equipment', 'rocky formation', 'plastic',
    'calendar', 'caravan', 'check-in-desk', 'ticket counter', 'brush', 'mill', 'covered bridge', 'bowling alley',
    'hanger', 'excavator', 'trestle', 'revolving door', 'blast furnace', 'scale', 'projector', 'soap', 'locker',
    'tractor', 'stretcher', 'frame', 'grating', 'alembic', 'candle', 'barrier', 'cardboard', 'cave', 'puddle', 'tarp',
    'price tag', 'watchtower', 'meters', 'light bulb', 'tracks', 'hair dryer', 'skirt', 'viaduct', 'paper towel',
    'coat', 'sheet', 'fire extinguisher', 'water wheel', 'pottery', 'magazine rack', 'teapot', 'microphone', 'support',
    'forklift', 'canyon', 'cash register', 'leaf', 'remote control', 'soap dish', 'windshield', 'cat', 'cue', 'vent',
    'videos', 'shovel', 'eaves', 'antenna', 'shipyard', 'hen', 'traffic cone', 'washing machines', 'truck crane', 'cds',
    'niche', 'scoreboard', 'briefcase', 'boot', 'sweater', 'hay', 'pack', 'bottle rack', 'glacier', 'pergola',
    'building materials', 'television camera', 'first floor', 'rifle', 'tennis table', 'stadium', 'safety belt',
    'cover', 'dish rack', 'synthesizer', 'pumpkin', 'gutter', 'fruit stand', 'ice floe', 'handle', 'wheelchair',
    'mousepad', 'diploma', 'fairground ride', 'radio', 'hotplate', 'junk', 'wheelbarrow', 'stream', 'toll plaza',
    'punching bag', 'trough', 'throne', 'chair desk', 'weighbridge', 'extractor fan', 'hanging clothes', 'dish',
    'alarm clock', 'ski lift', 'chain', 'garage', 'mechanical shovel', 'wine rack', 'tramway', 'treadmill', 'menu',
    'block', 'well', 'witness stand', 'branch', 'duck', 'casserole', 'frying pan', 'desk organizer', 'mast',
    'spectacles', 'service elevator', 'dollhouse', 'hammock', 'clothes hanging', 'photocopier', 'notepad', 'golf cart',
    'footpath', 'cross', 'baptismal font', 'boiler', 'skip', 'rotisserie', 'tables', 'water mill', 'helmet',
    'cover curtain', 'brick', 'table runner', 'ashtray', 'street box', 'stick', 'hangers', 'cells', 'urinal',
    'centerpiece', 'portable fridge', 'dvds', 'golf club', 'skirting board', 'water cooler', 'clipboard', 'camera',
    'pigeonhole', 'chips', 'food processor', 'post box', 'lid', 'drum', 'blender', 'cave entrance', 'dental chair',
    'obelisk', 'canoe', 'mobile', 'monitors', 'pool ball', 'cue rack', 'baggage carts', 'shore', 'fork', 'paper filer',
    'bicycle rack', 'coat rack', 'garland', 'sports bag', 'fish tank', 'towel dispenser', 'carriage', 'brochure',
    'plaque', 'stringer', 'iron', 'spoon', 'flag pole', 'toilet brush', 'book stand', 'water faucet', 'ticket office',
    'broom', 'dvd', 'ice bucket', 'carapace', 'tureen', 'folders', 'chess', 'root', 'sewing machine', 'model', 'pen',
    'violin', 'sweatshirt', 'recycling materials', 'mitten', 'chopping board', 'mask', 'log', 'mouse', 'grill', 'hole',
    'target', 'trash bag', 'chalk', 'sticks', 'balloon', 'score', 'hair spray', 'roll', 'runner', 'engine',
    'inflatable glove', 'games', 'pallets', 'baskets', 'coop', 'dvd player', 'rocking horse', 'buckets', 'bread rolls',
    'shawl', 'watering can', 'spotlights', 'post-it', 'bowls', 'security camera', 'runner cloth', 'lock', 'alarm',
    'side', 'roulette', 'bone', 'cutlery', 'pool balls', 'wheels', 'spice rack', 'plant pots', 'towel ring',
    'bread box', 'video', 'funfair', 'breads', 'tripod', 'ironing board', 'skimmer', 'hollow', 'scratching post',
    'tricycle', 'file box', 'mountain pass', 'tombstones', 'cooker', 'card game', 'golf bag', 'towel paper',
    'chaise lounge', 'sun', 'toilet paper holder', 'rake', 'key', 'umbrella stand', 'dartboard', 'transformer',
    'fireplace utensils', 'sweatshirts', 'cellular telephone', 'tallboy', 'stapler', 'sauna', 'test tube', 'palette',
    'shopping carts', 'tools', 'push button', 'star', 'roof rack', 'barbed wire', 'spray', 'ear', 'sponge', 'racket',
    'tins', 'eyeglasses', 'file', 'scarfs', 'sugar bowl', 'flip flop', 'headstones', 'laptop bag', 'leash',
    'climbing frame', 'suit hanger', 'floor spotlight', 'plate rack', 'sewer', 'hard drive', 'sprinkler', 'tools box',
    'necklace', 'bulbs', 'steel industry', 'club', 'jack', 'door bars', 'control panel', 'hairbrush', 'napkin holder',
    'office', 'smoke detector', 'utensils', 'apron', 'scissors', 'terminal', 'grinder', 'entry phone',
    'newspaper stand', 'pepper shaker', 'onions', 'central processing unit', 'tape', 'bat', 'coaster', 'calculator',
    'potatoes', 'luggage rack', 'salt', 'street number', 'viewpoint', 'sword', 'cd', 'rowing machine', 'plug',
    'andiron', 'pepper', 'tongs', 'bonfire', 'dog dish', 'belt', 'dumbbells', 'videocassette recorder', 'hook',
    'envelopes', 'shower faucet', 'watch', 'padlock', 'swimming pool ladder', 'spanners', 'gravy boat', 'notice board',
    'trash bags', 'fire alarm', 'ladle', 'stethoscope', 'rocket', 'funnel', 'bowling pins', 'valve', 'thermometer',
    'cups', 'spice jar', 'night light', 'soaps', 'games table', 'slotted spoon', 'reel', 'scourer', 'sleeping robe',
    'desk mat', 'dumbbell', 'hammer', 'tie', 'typewriter', 'shaker', 'cheese dish', 'sea star', 'racquet',
    'butane gas cylinder', 'paper weight', 'shaving brush', 'sunglasses', 'gear shift', 'towel rail', 'adding machine',
)

THING_IDS = frozenset(value - 1 for value in INSTANCE_TO_SEMANTIC)  # 0-based class ids of the 100 things
KINDS = {"semantic": ("sem", "semantic"), "instance": ("det", "rle"), "panoptic": ("seg", "panoptic"),
         "full": ("sem", "semantic")}
SPLITS = {"training": "train", "validation": "val", "train": "train", "val": "val"}
FOLDERS = {"train": "training", "val": "validation"}
LAYOUTS = ("auto", "release", "detectron2")
RELEASE_ROOT, FULL_ROOT = "ADEChallengeData2016", "ADE20K_2021_17_01"
_NUMBERED = re.compile(r"^ADE_[A-Za-z]+_(\d+)$")
_LABEL_MODES = ("L", "P")
_TIFF_MODES = ("I;16", "I;16L", "I;16B", "I", "L")
_FULL_IGNORE = 65535


def vocabulary(kind: str) -> Vocabulary:
    """The classes of a kind: the 150 classes (semantic, panoptic; 100 things), the 100 things alone (instance), or
    the 847 classes of ADE20K-full (all stuff: a semantic set)."""
    if kind == "full":
        return Vocabulary.from_coco_categories([{"id": i, "name": n, "isthing": 0}
                                                for i, n in enumerate(ADE847_CLASSES)])
    ids = sorted(THING_IDS) if kind == "instance" else range(len(ADE150_CLASSES))
    return Vocabulary.from_coco_categories([{"id": i, "name": ADE150_CLASSES[i], "isthing": int(i in THING_IDS)}
                                            for i in ids])


# ---------------------------------------------------------------------------------------------------- files
def _dataset_root(root: Path, kind: str) -> Path:
    """``root`` itself, or the published folder inside it (``ADEChallengeData2016`` / ``ADE20K_2021_17_01``)."""
    if not root.is_dir():
        raise DataError(f"ADE20K root folder not found: {root}")
    inner = root / (FULL_ROOT if kind == "full" else RELEASE_ROOT)
    return inner if inner.is_dir() else root


def annotation_path(image_path: Path, folder: str, suffix: str = ".png") -> Path:
    """``root/<images>/<split>/X.jpg`` -> ``root/<folder>/<split>/X<suffix>``."""
    return image_path.parents[2] / folder / image_path.parent.name / f"{image_path.stem}{suffix}"


def image_files(root: Path, kind: str, split_folder: str) -> list[Path]:
    folder = root / ("images_detectron2" if kind == "full" else "images") / split_folder
    if not folder.is_dir():
        raise DataError(f"ADE20K image folder not found: {folder}")
    files = sorted(folder.glob("*.jpg"))
    if not files:
        raise DataError(f"{folder}: no .jpg images")
    return files


def image_ids(files: list[Path]) -> dict[str, int]:
    """Image id by file stem: the number in ``ADE_<set>_<N>`` when every stem has one and no two share it, else the
    index in sorted file order."""
    numbers = [_NUMBERED.match(p.stem) for p in files]
    if all(numbers) and len({int(m.group(1)) for m in numbers}) == len(files):
        return {p.stem: int(m.group(1)) for p, m in zip(files, numbers)}
    return {p.stem: index for index, p in enumerate(files)}


def _class_ids(values: np.ndarray, path: Path, offset: int, void: int, count: int, what: str) -> np.ndarray:
    """Stored values -> class ids (value - offset), ``VOID`` where the value is ``void``; a value that is neither
    void nor a class is an ``Unreadable`` naming the values."""
    ids = values - offset
    ids[values == void] = VOID
    bad = (ids != VOID) & ((ids < 0) | (ids >= count))
    if bad.any():
        raise Unreadable(f"{what} value out of range", path, f"values {sorted(set(values[bad].tolist()))[:10]}")
    return ids


def read_release_semantic(record: ImageRecord) -> tuple[np.ndarray, Path]:
    """``annotations/<split>/X.png``: 0 = other (void), 1..150 -> class 0..149."""
    path = annotation_path(record.image_path, "annotations")
    return _class_ids(read_array(path, "label PNG", _LABEL_MODES), path, 1, 0, 150, "label PNG"), path


def read_detectron2_semantic(record: ImageRecord) -> tuple[np.ndarray, Path]:
    """``annotations_detectron2/<split>/X.png`` (prepare_ade20k_sem_seg.py): class 0..149, 255 = void."""
    path = annotation_path(record.image_path, "annotations_detectron2")
    return _class_ids(read_array(path, "label PNG", _LABEL_MODES), path, 0, 255, 150, "label PNG"), path


def read_full_semantic(record: ImageRecord) -> tuple[np.ndarray, Path]:
    """``annotations_detectron2/<split>/X.tif`` (prepare_ade20k_full_sem_seg.py): class 0..846, 65535 = void."""
    path = annotation_path(record.image_path, "annotations_detectron2", ".tif")
    values = read_array(path, "label TIFF", _TIFF_MODES)
    return _class_ids(values, path, 0, _FULL_IGNORE, len(ADE847_CLASSES), "label TIFF"), path


def read_instances(path: Path) -> tuple[tuple[int, int], list[tuple[int, int, np.ndarray]]]:
    """``annotations_instance/<split>/X.png`` -> its (height, width) and (G instance index, 0-based 150-class id,
    mask) for each non-zero G, in G order. An instance spanning several R classes, or an R outside 1..100, is an
    ``Unreadable``."""
    pixels = read_array(path, "instance PNG", ("RGB", "RGBA"))
    if pixels.ndim != 3 or pixels.shape[2] < 3:
        raise Unreadable("instance PNG of the wrong kind", path, f"shape {pixels.shape}, expected H x W x 3")
    classes, index = pixels[..., 0], pixels[..., 1]
    out = []
    for g in np.unique(index).tolist():
        if g == 0:
            continue
        mask = index == g
        r = np.unique(classes[mask]).tolist()
        if len(r) != 1:
            raise Unreadable("instance with several classes", path, f"instance {g}: R values {r}")
        if not 1 <= r[0] <= len(INSTANCE_TO_SEMANTIC):
            raise Unreadable("unknown instance class", path, f"instance {g}: R value {r[0]} is not in 1..100")
        out.append((g, INSTANCE_TO_SEMANTIC[r[0] - 1] - 1, mask))
    return index.shape, out


def read_release_panoptic(record: ImageRecord) -> IdMap:
    """Semantic + instance PNGs combined as prepare_ade20k_pan_seg.py does: one segment per stuff class of the
    semantic map, then each instance pasted over it; thing-class pixels without an instance are void."""
    classes, semantic_path = read_release_semantic(record)
    instance_path = annotation_path(record.image_path, "annotations_instance")
    shape, instances = read_instances(instance_path)
    if classes.shape != (record.height, record.width):
        raise Unreadable("label map size differs from the image", semantic_path,
                         f"{classes.shape[1]}x{classes.shape[0]} vs {record.width}x{record.height}")
    if shape != classes.shape:
        raise Unreadable("instance map size differs from the semantic map", instance_path,
                         f"{shape[1]}x{shape[0]} vs {classes.shape[1]}x{classes.shape[0]} of {semantic_path}")
    stuff = (classes != VOID) & ~np.isin(classes, list(THING_IDS))
    ids = np.where(stuff, classes + 1, 0)
    for g, class_id, mask in instances:
        ids[mask] = 1000 * (class_id + 1) + g
    segments = [{"id": value, "category_id": value - 1 if value < 1000 else value // 1000 - 1, "iscrowd": 0}
                for value in np.unique(ids).tolist() if value]
    return IdMap(ids, segments, instance_path)


def encode_release_instances(record: ImageRecord, vocab: Vocabulary, dataset: str) -> Encoded:
    """One object per instance of ``annotations_instance/<split>/X.png`` (RLE mask, tight box, pixel area)."""
    path = annotation_path(record.image_path, "annotations_instance")

    def read():
        shape, instances = read_instances(path)
        return shape, [(g, class_id, 0, mask) for g, class_id, mask in instances], {}
    return encode_instance_map(record, vocab, dataset, path, read)


# ---------------------------------------------------------------------------------------------------- records
def _records(files: list[Path], ids: dict[str, int], needed: list[tuple[str, str]], skip_missing: bool,
             report: ReadReport) -> list[ImageRecord]:
    """One record per image; an image without one of its ``needed`` (folder, suffix) annotation files is an error,
    or with ``skip_missing`` a counted skip."""
    records = []
    for image_path in files:
        missing = [p for p in (annotation_path(image_path, f, s) for f, s in needed) if not p.is_file()]
        if missing:
            message = f"{missing[0]}: annotation file not found (for {image_path})"
            if not skip_missing:
                raise DataError(message + " (skip_missing=true counts and skips such images)")
            report.skip_image("missing annotation file", message)
            continue
        height, width = image_size(image_path)
        records.append(ImageRecord(ids[image_path.stem], image_path, height, width, []))
    return records


def _stem(value) -> str:
    return Path(str(value)).stem


def _check_categories(data: dict, json_path: Path, vocab: Vocabulary) -> None:
    if not isinstance(data.get("categories"), list):
        raise DataError(f"{json_path}: missing 'categories'; is this a Mask2Former ADE20K file?")
    try:
        unknown = sorted({int(c["id"]) for c in data["categories"]} - set(vocab.ids))
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{json_path}: a category lacks a valid {err}") from err
    if unknown:
        raise DataError(f"{json_path}: category ids {unknown[:10]} are not ADE20K-150 class ids "
                        f"{vocab.ids[0]}..{vocab.ids[-1]} of this kind")


def _records_from_panoptic_json(files: list[Path], ids: dict[str, int], json_path: Path, png_dir: Path,
                                vocab: Vocabulary, skip_missing: bool, report: ReadReport) -> list[ImageRecord]:
    """Records of prepare_ade20k_pan_seg.py's JSON (image ids are file stems) and PNG folder, paired with the images
    by stem."""
    data = load_json(json_path)
    if not isinstance(data.get("annotations"), list):
        raise DataError(f"{json_path}: missing 'annotations'; is this prepare_ade20k_pan_seg.py output?")
    _check_categories(data, json_path, vocab)
    if not png_dir.is_dir():
        raise DataError(f"ADE20K panoptic PNG folder not found: {png_dir} (beside {json_path})")
    by_stem = panoptic_annotations(data, json_path, vocab, lambda ann: _stem(ann["file_name"]))
    records = []
    for image_path in files:
        ann = by_stem.get(image_path.stem)
        if ann is None:
            report.skip_image("no panoptic annotation", f"{json_path}: no annotation for {image_path}")
            continue
        if not (png_dir / ann["file_name"]).is_file():
            message = f"{png_dir / ann['file_name']}: panoptic PNG not found (listed in {json_path})"
            if not skip_missing:
                raise DataError(message + " (skip_missing=true counts and skips such images)")
            report.skip_image("missing panoptic PNG", message)
            continue
        height, width = image_size(image_path)
        records.append(ImageRecord(ids[image_path.stem], image_path, height, width, ann["segments"],
                                   panoptic_path=png_dir / ann["file_name"]))
    for stem in sorted(set(by_stem) - set(ids)):
        message = f"{json_path}: image {stem!r} has no {stem}.jpg in {files[0].parent}"
        if not skip_missing:
            raise DataError(message + " (skip_missing=true counts and skips such images)")
        report.skip_image("missing image file", message)
    return records


def _instance_json_data(files: list[Path], ids: dict[str, int], json_path: Path, vocab: Vocabulary) -> dict:
    """prepare_ade20k_ins_seg.py's JSON adapted for ``load_coco_detection``: image ids (file stems there) replaced by
    this converter's ids, categories by the reference names (after checking the ids)."""
    data = load_json(json_path)
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{json_path}: missing {key!r}; is this prepare_ade20k_ins_seg.py output?")
    _check_categories(data, json_path, vocab)
    new_id, spare = {}, max(ids.values(), default=-1) + 1
    images = []
    for image in data["images"]:
        try:
            stem, old = _stem(image["file_name"]), image["id"]
        except (KeyError, TypeError) as err:
            raise DataError(f"{json_path}: image entry {image!r:.200} lacks a valid {err}") from err
        if stem not in ids:  # not in the image folder: load_coco_detection reports it missing
            ids = {**ids, stem: spare}
            spare += 1
        new_id[str(old)] = ids[stem]
        images.append({**image, "id": ids[stem]})
    annotations = []
    for ann in data["annotations"]:
        key = str(ann.get("image_id"))
        annotations.append({**ann, "image_id": new_id.get(key, ann.get("image_id"))})
    categories = [{"id": c.id, "name": c.name, "isthing": 1} for c in vocab.categories]
    return {**data, "images": images, "annotations": annotations, "categories": categories}


# ---------------------------------------------------------------------------------------------------- convert
def _choose_layout(root: Path, kind: str, folder: str, short: str, layout: str) -> str:
    if kind == "full":
        if layout == "release":
            raise DataError("kind=full reads the files prepare_ade20k_full_sem_seg.py writes (images_detectron2/, "
                            "annotations_detectron2/): use layout=auto or layout=detectron2")
        return "detectron2"
    release = {"semantic": [root / "annotations" / folder],
               "instance": [root / "annotations_instance" / folder],
               "panoptic": [root / "annotations" / folder, root / "annotations_instance" / folder]}[kind]
    coco = {"semantic": root / "annotations_detectron2" / folder,
            "instance": root / f"ade20k_instance_{short}.json",
            "panoptic": root / f"ade20k_panoptic_{short}.json"}[kind]
    if layout == "auto":
        if all(p.is_dir() for p in release):
            return "release"
        if coco.exists():
            return "detectron2"
        missing = [str(p) for p in release if not p.is_dir()]
        raise DataError(f"ADE20K {kind} annotations not found: {', '.join(missing)} (release) nor {coco} "
                        f"(Mask2Former's preparation scripts)")
    if layout == "release":
        for folder_path in release:
            if not folder_path.is_dir():
                raise DataError(f"ADE20K annotation folder not found: {folder_path}")
    elif not coco.exists():
        raise DataError(f"ADE20K {kind} annotations not found: {coco}")
    return layout


def convert(root, split, kind, out, name=None, layout="auto", maxcount=1000, workers=0, skip_missing=False,
            limit=None, progress=True) -> ConversionSummary:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, not {kind!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, not {split!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, not {layout!r}")
    short = SPLITS[split]
    folder = FOLDERS[short]
    root = _dataset_root(Path(root), kind)
    name = name or f"ade20k_{kind}_{short}"
    task, mask_format = KINDS[kind]
    vocab = vocabulary(kind)
    layout = _choose_layout(root, kind, folder, short, layout)
    files = image_files(root, kind, folder)
    ids = image_ids(files)
    report = ReadReport()
    if kind == "full":
        records = _records(files, ids, [("annotations_detectron2", ".tif")], skip_missing, report)
        encode = partial(encode_semantic, vocab=vocab, dataset=name, read=read_full_semantic)
    elif kind == "semantic":
        label_folder = "annotations" if layout == "release" else "annotations_detectron2"
        records = _records(files, ids, [(label_folder, ".png")], skip_missing, report)
        read = read_release_semantic if layout == "release" else read_detectron2_semantic
        encode = partial(encode_semantic, vocab=vocab, dataset=name, read=read)
    elif kind == "panoptic" and layout == "release":
        records = _records(files, ids, [("annotations", ".png"), ("annotations_instance", ".png")], skip_missing,
                           report)
        encode = partial(encode_panoptic, vocab=vocab, dataset=name, read=read_release_panoptic)
    elif kind == "panoptic":
        records = _records_from_panoptic_json(files, ids, root / f"ade20k_panoptic_{short}.json",
                                               root / f"ade20k_panoptic_{short}", vocab, skip_missing, report)
        encode = partial(encode_panoptic, vocab=vocab, dataset=name, read=read_coco_panoptic)
    elif layout == "release":
        records = _records(files, ids, [("annotations_instance", ".png")], skip_missing, report)
        encode = partial(encode_release_instances, vocab=vocab, dataset=name)
    else:
        json_path = root / f"ade20k_instance_{short}.json"
        data = _instance_json_data(files, ids, json_path, vocab)
        vocab, records, report = load_coco_detection(json_path, files[0].parent, skip_missing=skip_missing,
                                                     data=data)
        records.sort(key=lambda r: r.image_id)
        encode = partial(encode_detection, vocab=vocab, dataset=name, mask_format="rle")
    records = records[:limit] if limit is not None else records
    source = {"dataset": "ade20k-full" if kind == "full" else "ade20k-150", "root": str(root), "split": folder,
              "kind": kind, "layout": layout}
    return write_shards(records, encode, out, name, task, mask_format, vocab, maxcount=maxcount, workers=workers,
                        progress=progress, reader_skips=(report.skipped_images, report.skipped_objects),
                        reader_adjusted=report.adjusted_objects, source=source)


OPTIONS = converter_options(
    root=Option("ADEChallengeData2016 folder (kind=full: ADE20K_2021_17_01), or a folder holding it", required=True,
                check=path),
    split=Option("split: training or validation (train, val)", "validation", one_of(tuple(SPLITS))),
    kind=Option("semantic (sem, 150 classes), instance (det, RLE masks, 100 things), panoptic (seg) or full (sem, "
                "847 classes)", "panoptic", one_of(tuple(KINDS))),
    layout=Option("annotation files: auto (the release's when present, else Mask2Former's), release or detectron2 "
                  "(annotations_detectron2/, ade20k_{panoptic,instance}_<split>.json)", "auto", one_of(LAYOUTS)),
)
OPTIONS["name"] = Option("data set name; prefix of the shard files (no dots); default ade20k_<kind>_<train|val>",
                         None, path)


def main(argv=None) -> int:
    return run(lambda a: convert(a.root, a.split, a.kind, a.out, a.name, a.layout, a.maxcount, a.workers,
                                 a.skip_missing, a.limit, a.progress),
               argv, OPTIONS, "python -m data_prep.ade20k", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
