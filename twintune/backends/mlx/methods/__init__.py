"""Method layer modules for MLX, by the name a plan's WRAP or INSERT surgery gives (mirrors backends/torch/methods/)."""

from twintune.backends.mlx.methods.dora import DoRALinear
from twintune.backends.mlx.methods.ia3 import IA3Linear
from twintune.backends.mlx.methods.lora import LoRALinear
from twintune.backends.mlx.methods.adapter import Bottleneck
from twintune.backends.mlx.methods.prompt import PromptEmbedding, PromptEncoder
from twintune.backends.mlx.methods.prefix import PrefixEncoder
from twintune.backends.mlx.methods.loreft import LoReFTIntervention
from twintune.backends.mlx.methods.head import LinearHead

LAYERS = {
    "lora": LoRALinear, "dora": DoRALinear, "ia3": IA3Linear,
    "bottleneck": Bottleneck, "prompt_embedding": PromptEmbedding, "prompt_encoder": PromptEncoder,
    "prefix": PrefixEncoder, "loreft": LoReFTIntervention, "linear_head": LinearHead,
}
