import pytest
import torch

# A model small enough for the CPU, and the two architecture variants every model test covers.
SMALL = dict(vocab_size=61, n_layer=2, n_head=2, n_embd=32, mlp_hidden=72, max_seq_len=40, image_size=16,
             patch_size=8, vision_layers=1, vision_width=32, vision_heads=2)
VARIANTS = {
    "vit-learned-layernorm": {},
    "cnn-rope-rmsnorm-gqa": dict(vision_type="cnn", pos_embedding="rope", norm="rmsnorm", n_head=4, n_kv_head=2,
                                 bias=False, tie_embeddings=False),
}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The model tests run small matmuls on 2 shared cores, where a second OpenMP thread mostly
    spins: one thread measured ~5x faster for the 100-step training test here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
