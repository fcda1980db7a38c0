"""Where each stage's outputs live (relative to the repo root); dvc.yaml lists the same paths."""

from pathlib import Path

DATA = Path("data")
SYNTH_ROOT = DATA / "raw" / "synthetic"
MANIFEST = DATA / "manifest.parquet"
REPORTS = DATA / "reports"
VALIDATION_JSON = REPORTS / "validation.json"
VALIDATION_MD = REPORTS / "validation.md"
CONTACT_SHEET = REPORTS / "contact_sheet.png"
SPLITS = DATA / "splits"
PREPARED = DATA / "prepared"
METRICS = Path("metrics")
MODELS = Path("models")
BUNDLE = MODELS / "model.pt"
CHECKPOINT = MODELS / "checkpoint.pt"
PREDICTIONS = DATA / "predictions"
TRAIN_REPORTS = Path("reports") / "train"
CALIBRATION = Path("reports") / "calibrate"
EXPORT = Path("reports") / "export"
ONNX_MODEL = MODELS / "model.onnx"
EXPLAIN = Path("reports") / "explain"
ONNX_REGISTRATION = MODELS / "onnx.json"
