"""Method layer modules for torch, by the name a plan's WRAP surgery gives (mirrors backends/mlx/methods/)."""

from twintune.backends.torch.methods.dora import DoRALinear
from twintune.backends.torch.methods.ia3 import IA3Linear
from twintune.backends.torch.methods.lora import LoRALinear
# [adapter]
# [prompt]
# [prefix]
# [loreft]

LAYERS = {
    "lora": LoRALinear, "dora": DoRALinear, "ia3": IA3Linear,
    # [adapter]
    # [prompt]
    # [prefix]
    # [loreft]
}
