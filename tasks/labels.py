"""Class names shared by every adapter (ISIC 2019 is the canonical vocabulary)."""

ISIC_CLASSES: tuple[str, ...] = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")

# HAM10000's dx codes onto ISIC 2019 names (akiec covers actinic keratosis and Bowen's disease).
HAM_TO_ISIC: dict[str, str] = {
    "akiec": "AK",
    "bcc": "BCC",
    "bkl": "BKL",
    "df": "DF",
    "mel": "MEL",
    "nv": "NV",
    "vasc": "VASC",
}

FULL_NAMES: dict[str, str] = {
    "MEL": "melanoma",
    "NV": "melanocytic naevus",
    "BCC": "basal cell carcinoma",
    "AK": "actinic keratosis",
    "BKL": "benign keratosis",
    "DF": "dermatofibroma",
    "VASC": "vascular lesion",
    "SCC": "squamous cell carcinoma",
    "UNK": "unknown / other",
}

MALIGNANT: frozenset[str] = frozenset({"MEL", "BCC", "SCC", "AK"})


def full_name(label: str) -> str:
    """Plain-language name for a class; folder datasets keep their folder names."""
    return FULL_NAMES.get(label, label.replace("_", " "))
