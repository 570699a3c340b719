"""normgrowth: norm growth and stability in localized sequential knowledge editing."""
import warnings as _warnings

__version__ = "0.1.0"

# huggingface_hub imports tqdm.auto, which warns inside Jupyter kernels without ipywidgets; the
# package's own progress bars are plain text, so the warning says nothing about this package
_warnings.filterwarnings("ignore", message="IProgress not found")
