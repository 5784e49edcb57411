"""unipeft: parameter-efficient fine-tuning as one engine.

Every method (lora, dora, ia3, houlsby, pfeiffer, parallel, prefix, prompt, mam, unipelt, ...) is a preset — data — of
one operation on a frozen model, h ← compose(h, f(x_src·W_down)·W_up) (He et al. 2022).

    import unipeft
    am = unipeft.attach(model, "lora", r=16)      # an AdaptedModel; forward/generate pass through
    am.save("adapter/"); unipeft.load(model, "adapter/")
"""

from .arch import sites
from .base_ops import accelerate
from .combine import combine
from .compose import Average, Fuse, Stack
from .errors import UnipeftError
from .graphs import graph_layers
from .io import load
from .model import AdaptedModel, attach
from .peft_io import import_peft
from .presets import list_presets, preset
from .quant import quantize
from .recipe import Part, Recipe
from .run import from_pretrained

__version__ = "0.1.0"

__all__ = ["AdaptedModel", "Average", "Fuse", "Part", "Recipe", "Stack", "UnipeftError", "accelerate", "attach",
           "combine", "from_pretrained", "graph_layers", "import_peft", "list_presets", "load", "preset", "quantize",
           "sites", "__version__"]
