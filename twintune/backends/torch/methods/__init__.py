"""Method layer modules for torch, by the name a plan's WRAP or INSERT surgery gives (mirrors backends/mlx/methods/)."""

from twintune.backends.torch.methods.dora import DoRALinear
from twintune.backends.torch.methods.ia3 import IA3Linear
from twintune.backends.torch.methods.lora import LoRALinear
from twintune.backends.torch.methods.adapter import Bottleneck
from twintune.backends.torch.methods.prompt import PromptEmbedding, PromptEncoder
from twintune.backends.torch.methods.prefix import PrefixEncoder
from twintune.backends.torch.methods.loreft import LoReFTIntervention
from twintune.backends.torch.methods.head import LinearHead

LAYERS = {
    "lora": LoRALinear, "dora": DoRALinear, "ia3": IA3Linear,
    "bottleneck": Bottleneck, "prompt_embedding": PromptEmbedding, "prompt_encoder": PromptEncoder,
    "prefix": PrefixEncoder, "loreft": LoReFTIntervention, "linear_head": LinearHead,
}
