import json, sys, time, shutil, os
from pathlib import Path
a = json.loads(sys.argv[1])
import torch
torch.set_num_threads(a.get("threads", 2))
from transformers import Qwen2VLForConditionalGeneration, AutoProcessor
from vlmtune.config.overrides import deep_merge
from vlmtune.config.schema import Config
from vlmtune.data.shapes import corpus_texts
from vlmtune.model.tiny_qwen import build_processor, build_tokenizer, tiny_config
from vlmtune.train.recipe import train
from vlmtune.builtin import base as B
from vlmtune.eval.probe import probe_base, probe_table
name = a["name"]; out = Path("/tmp/exp")/name
import vlmtune.data.shapes as S
if "bg" in a: S.BACKGROUND = tuple(a["bg"])
os.environ["VLMTUNE_CACHE"] = str(out) + "_cache"
shutil.rmtree(out, ignore_errors=True)
t0=time.time()
tok = build_tokenizer(corpus_texts())
proc = build_processor(tok, min_pixels=a.get("minpx", 32*32), patch_size=a.get("patch", 8), merge_size=a.get("merge",2), image_mean=a.get("mean"))
torch.manual_seed(0)
cfgm = tiny_config(tok, text_hidden=a.get("th",128), text_layers=a.get("tl",2), vision_dim=a.get("vd",64), vision_depth=a.get("vdepth",2), rope_theta=a.get("theta",2.0), patch_size=a.get("patch",8), vision_heads=a.get("vh",2), merge_size=a.get("merge",2))
model = Qwen2VLForConditionalGeneration(cfgm)
print("params", sum(p.numel() for p in model.parameters()))
model.save_pretrained(out/"init", safe_serialization=True); proc.save_pretrained(out/"init")
pre = deep_merge(B.PRETRAIN, {"model":{"path":str(out/"init")},"train":{"output_dir":str(out/"run"),"progress_bar":False,
   "max_steps":a.get("steps",800),"learning_rate":a.get("lr",2e-3),"batch_size":a.get("bs",16),"warmup_steps":a.get("warm",40), "logging_steps":50},
   "data":{"builtin_train_samples":a.get("images",4096)}})
for k,v in a.get("extra",{}).items(): pre = deep_merge(pre, v)
cfg = Config.model_validate(pre)
res = train(cfg)
t1=time.time()
m = Qwen2VLForConditionalGeneration.from_pretrained(res.final_dir); p = AutoProcessor.from_pretrained(res.final_dir)
r = probe_base(m, p)
print(probe_table(r, 32))
print("RESULT", name, json.dumps({k: round(v.exact_match,3) for k,v in r.kinds.items()}), "gap", round(r.gap,3), "train_s", round(t1-t0,1), "loss", res.last_loss)
