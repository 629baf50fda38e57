"""A teacher trained in its own process, for the kill -9 test: tiny encoders, random latents, the real
training loop with its checkpoint; the trained weights go to OUT/teacher.pt.
Usage: python tests/teacher_training.py OUT STEPS"""
import sys
from pathlib import Path

import torch

from server.distill.teacher import train_teacher
from shared.models.first_encoder import FirstEncoder
from shared.models.second_encoder import SecondEncoder


def main(out: Path, steps: int) -> None:
    torch.manual_seed(0)
    e1, e2 = FirstEncoder(1, 4, (16, 32)).eval(), SecondEncoder(4, 32, 4, 32).eval()
    with torch.no_grad():
        latents = e1(torch.rand(512, 1, 32, 32))
    labels = torch.randint(0, 10, (512,), generator=torch.Generator().manual_seed(1))
    teacher, info = train_teacher(e1, e2, latents, labels, 10, torch.device("cpu"), steps=steps, batch_size=64,
                                  checkpoint=out / "training.pt")
    torch.save(teacher.state_dict(), out / "teacher.pt")
    print(f"resumed_at_step={info['resumed_at_step']}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
