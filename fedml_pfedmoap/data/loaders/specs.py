"""Where each on-disk benchmark dataset lives and what its layouts look like (docs/data.md §Layouts): one place for
the dataset specs the loaders read.

``SPECS``: the five CoOp datasets (folder spellings, split file, torchvision tree, prompt template); ``DOMAINNET`` /
``OFFICE``: the feature-shift datasets (domains and the fixed, ordered class list); ``CIFAR_EXPECTED``: the CIFAR
pickle layouts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class CoopSpec:
    """Where one CoOp dataset lives: folder spellings, image sub-folder, split file, torchvision tree, template."""

    name: str
    folders: Tuple[str, ...]
    image_dir: str
    split_file: str
    tv_folders: Tuple[str, ...]
    tv_expected: str
    template: str

    def expected_coop(self) -> str:
        f = self.folders[0]
        return (f"<root>/{f}/{self.split_file} with images under <root>/{f}/{self.image_dir}/ (folder also accepted "
                f"as {', '.join(self.folders[1:])}; or image_root=<folder>)")


SPECS: Dict[str, CoopSpec] = {s.name: s for s in [
    CoopSpec("caltech101", ("caltech-101", "caltech101", "caltech_101", "Caltech101"), "101_ObjectCategories",
             "split_zhou_Caltech101.json", ("caltech101",),
             "<root>/caltech101/101_ObjectCategories/<class>/image_0001.jpg (no split file: a seeded stratified "
             "50/20/30 train/val/test split is generated)", "a photo of a {}."),
    CoopSpec("oxford_pets", ("oxford_pets", "oxford-pets", "OxfordPets", "oxford-iiit-pet"), "images",
             "split_zhou_OxfordPets.json", ("oxford-iiit-pet", "oxford_pets"),
             "<root>/oxford-iiit-pet/images/<Breed>_<n>.jpg plus annotations/{trainval.txt,test.txt}",
             "a photo of a {}, a type of pet."),
    CoopSpec("oxford_flowers", ("oxford_flowers", "oxford-flowers", "OxfordFlowers", "flowers-102", "flowers102"),
             "jpg", "split_zhou_OxfordFlowers.json", ("flowers-102", "oxford_flowers"),
             "<root>/flowers-102/jpg/image_00001.jpg plus imagelabels.mat and setid.mat",
             "a photo of a {}, a type of flower."),
    CoopSpec("food101", ("food-101", "food101", "Food101", "food_101"), "images", "split_zhou_Food101.json",
             ("food-101", "food101"), "<root>/food-101/images/<class>/<id>.jpg plus meta/{train,test}.json",
             "a photo of {}, a type of food."),
    CoopSpec("dtd", ("dtd", "DTD", "dtd/dtd"), "images", "split_zhou_DescribableTextures.json", ("dtd/dtd", "dtd"),
             "<root>/dtd/dtd/images/<class>/*.jpg plus <root>/dtd/dtd/labels/{train,test}<1..10>.txt",
             "{} texture."),
]}


@dataclass(frozen=True)
class DomainSpec:
    """One feature-shift dataset: its domains, its fixed class list (label order) and folder spellings."""

    name: str
    domains: Tuple[str, ...]
    classes: Tuple[str, ...]
    folders: Tuple[str, ...]

    def expected(self, layout: str) -> str:
        f = self.folders[0]
        if layout == "fedbn":
            return (f"<root>/{f}/<domain>_train.pkl and <domain>_test.pkl for each domain in "
                    f"{', '.join(self.domains)} (pickled (paths, text_labels), paths relative to <root>; also "
                    f"accepted: {', '.join(x + '/' for x in self.folders[1:])} or pickle_dir=, image_root=)")
        return (f"<root>/{f}/<domain>/<class>/*.jpg (or <root>/<domain>/...) for domains {', '.join(self.domains)} "
                f"and classes {', '.join(self.classes)}")


DOMAINNET = DomainSpec("domainnet", ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
                       ("bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale", "windmill",
                        "wine_glass", "zebra"), ("DomainNet", "domainnet", "domain_net"))
OFFICE = DomainSpec("office_caltech10", ("amazon", "caltech", "dslr", "webcam"),
                    ("back_pack", "bike", "calculator", "headphones", "keyboard", "laptop_computer", "monitor", "mouse",
                     "mug", "projector"), ("office_caltech_10", "office_caltech10", "OfficeCaltech10", "office"))


CIFAR_EXPECTED = {
    "cifar10": "<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (torchvision's pickles)",
    "cifar100": "<root>/cifar-100-python/{train, test, meta} (torchvision's pickles)",
}
