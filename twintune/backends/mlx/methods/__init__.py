"""Method layer modules for MLX, by the name a plan's WRAP surgery gives (mirrors backends/torch/methods/)."""

from twintune.backends.mlx.methods.dora import DoRALinear
from twintune.backends.mlx.methods.ia3 import IA3Linear
from twintune.backends.mlx.methods.lora import LoRALinear
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
