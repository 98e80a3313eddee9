"""The trainer: multimodal pretraining under DeepSpeed ZeRO (stages 0-3, offload), on GPUs and on
CPU ranks alike. Entry point: `mmgpt_engine.train.cli.main` (`mmgpt-train`,
`python -m mmgpt_engine.train`, `deepspeed --module mmgpt_engine.train`).

    config.py      the training yaml (sections, checks)
    ds_config.py   the DeepSpeed JSON: "auto" filling and consistency checks; the lr schedule
    preflight.py   environment and data checks that run before anything is built
    batches.py     resumable training batches, held-out shares
    weights.py     model in (--init_from, --freeze) and out (consolidated fp32 export) of the engine
    checkpoint.py  DeepSpeed checkpoints with client state and a crash-safe `latest`
    loop.py        the training loop
    evaluation.py  validation loss and caption exact-match
    metrics.py     metrics.jsonl, TensorBoard, tqdm, MFU, the loss curve
    faults.py      stop signals and non-finite losses
"""
