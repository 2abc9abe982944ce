import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from helpers import make_adapter, make_model

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
a = make_model(out / "llama", "llama", layers=2)
u = make_model(out / "llama_u", "llama", layers=2, seed=1)
make_adapter(a, out / "llama_ad", "llama", r=4, alpha=8)
q = make_model(out / "qwen", "qwen2", layers=2)
make_adapter(q, out / "qwen_ad", "qwen2", r=4, alpha=16)
