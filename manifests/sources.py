"""The names that converter and runtime share, as plain data: image magic bytes, MD-v2 source lists, VTAB groups.

One registry, read by `convert`, by the rest of `manifests` and by `lite_train`, so that none of them keeps a
copy. It imports nothing (not even the standard library), so the byte decoder and every other module may
read it at no cost.
"""

# Leading bytes of each image format the shards store, by member extension: the converter names a member
# `.jpg` or `.png` from these bytes (never from the input's file name), and the decoder picks its codec by them.
IMAGE_MAGIC = {"jpg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n"}

# MD-v2 as LITE uses it (reference §4, LITE:src/run.py `init_data`): ImageNet is train-only (flat 1000-class
# spec), MNIST is an extra training source, VGG Flowers is gone (it belongs to VTAB). Source names as converted
# under `<root>/md/`.
MD_V2_TRAIN = ("ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi", "mnist")
MD_V2_VALID = ("omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi", "mscoco")
MD_V2_TEST = ("omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi", "traffic_sign", "mscoco")

# VTAB-1k's 19 task ids by group, groups and tasks in the order of the task table
# (`../shared/reference/vtab_webdataset.md` §1.2). A task id is the converted source's name; its group is
# saved in its source.json (`extra["group"]`), which is what the evaluation's per-group means read.
VTAB_TASKS = {
    "natural": ("caltech101", "cifar100", "dtd", "oxford_flowers102", "oxford_iiit_pet", "sun397", "svhn"),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": ("clevr_count_all", "clevr_closest_object_distance", "dmlab", "kitti_closest_vehicle_distance",
                   "dsprites_label_x_position", "dsprites_label_orientation", "smallnorb_label_azimuth",
                   "smallnorb_label_elevation"),
}
VTAB_GROUPS = tuple(VTAB_TASKS)  # ("natural", "specialized", "structured")
