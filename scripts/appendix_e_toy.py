"""Appendix E on the bundled toy model: DDIM-inversion reconstructions and editability, plain textual
inversion against pivotal tuning, for the ring and the star, judged by the toy scorer (README section
"Appendix E: DDIM inversion and pivotal tuning").

    python scripts/appendix_e_toy.py --out outputs/appendix_e            # resumable: finished parts are kept
    python scripts/appendix_e_toy.py --out outputs/appendix_e --assets assets/appendix_e   # also small PNGs

Per concept: 5 training images (`write_concept_images`, --seed); stage 1 = configs/toy/invert.yaml
(--inversion_steps); stage 2 = configs/toy/pivotal.yaml around that word (--pivot_steps at --model_lr, UNet
only). Per model (plain: the base model + the word; pivotal: the stage-2 UNet + the same word):
reconstruction = scorer agreement with each training image's attributes after a DDIM inversion round trip
under "a photo of a *" (--ddim_steps, scales --scales), and the edits "a red *" / "a * on a black
background" from the same x_T; editability = G3's joint rate (concept and edit) of fresh samples
(`ldm.toy.gates.sample`, 50 DDIM steps, guidance --sample_scales, --samples per prompt, seed --seed).
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm.data.toy_world import ATTRIBUTE_VALUES, write_concept_images  # noqa: E402
from ldm.image_grid import make_grid, save_image, to_uint8  # noqa: E402
from ldm.loading import load_model  # noqa: E402
from ldm.scripts_common import run_script  # noqa: E402
from ldm.toy import gates  # noqa: E402
from ldm.toy.scorer import load_scorer  # noqa: E402
from ldm.util import atomic_write  # noqa: E402

PROMPT = gates.FIDELITY.format("*")  # "a photo of a *"
EDITS = [e for e in gates.EDITS if e.attribute in ("color", "background")]  # "a red *", black background


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="models/toy/toy_ldm.safetensors")
    p.add_argument("--scorer", default="assets/toy/scorer.safetensors")
    p.add_argument("--concepts", nargs="+", default=["ring", "star"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inversion_steps", type=int, default=300)
    p.add_argument("--pivot_steps", type=int, default=150)
    p.add_argument("--model_lr", type=float, default=5e-5)
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    p.add_argument("--samples", type=int, default=32, help="samples per prompt for editability")
    p.add_argument("--sample_scales", type=float, nargs="+", default=[5.0], help="guidance of the samples")
    p.add_argument("--out", default="outputs/appendix_e")
    p.add_argument("--assets", default=None, help="also write the grids as small PNGs here")
    p.add_argument("--table", action="store_true", help="print the measured figures as a Markdown table, exit")
    return p


def table(report: dict) -> str:
    """The README's table: per concept and model, reconstruction (same shape and colour of 5, and the mean
    agreement over shape, colour, background, position, fill) per scale, and the G3 joint rates."""
    edit_prompts = [e.template.format("*") for e in EDITS]
    scales = [f"{s:g}" for s in report["settings"]["scales"]]
    sample_scales = [f"{s:g}" for s in report["settings"]["sample_scales"]]
    head = ["concept / model", *(f"rec. scale {s}: shape+colour (mean agreement)" for s in scales),
            *(f"joint \"{p}\" (g {g})" for g in sample_scales for p in edit_prompts),
            *(f"concept \"{PROMPT}\" (g {g})" for g in sample_scales)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(k for k in report if "/" in k):
        r = report[key]
        rec = r["reconstruction"]
        cells = [f"{rec[s]['same_shape_and_colour']}/{rec[s]['of']} ({np.mean(list(rec[s]['agreement'].values())):.2f})"
                 for s in scales]
        cells += [f"{r['editability'][g][p]['joint']:.2f}" for g in sample_scales for p in edit_prompts]
        cells += [f"{r['editability'][g][PROMPT]['concept']:.2f}" for g in sample_scales]
        lines.append("| " + " | ".join([key, *cells]) + " |")
    return "\n".join(lines)


def done(path: Path) -> bool:
    return path.is_file()


def train_words(opt, concept: str, root: Path) -> tuple[Path, Path, list]:
    """(plain embeddings, pivotal model file, training images with attributes), trained once."""
    from pivotal_tuning import export_model

    from ldm.training import train

    images = root / "images"
    meta = root / "images.json"
    if not done(meta):
        if images.exists():
            shutil.rmtree(images)
        items = write_concept_images(images, concept, n=5, seed=opt.seed)
        meta.write_text(json.dumps([[str(p), a.as_dict()] for p, a in items]))
    items = json.loads(meta.read_text())
    emb = root / "plain_embeddings.pt"
    if not done(emb):
        run = train("configs/toy/invert.yaml", actual_resume=opt.ckpt, name=f"{concept}_plain",
                    data_root=str(images), logdir=str(root / "logs"), seed=opt.seed, no_test=True,
                    datadir_in_name=False, trainer={"max_steps": opt.inversion_steps}, attention="math",
                    overrides=["lightning.callbacks.image_logger.params.disabled=true"])
        shutil.copyfile(run.embeddings, emb)
    model_file = root / "pivotal_model.safetensors"
    if not done(model_file):
        run = train("configs/toy/pivotal.yaml", actual_resume=opt.ckpt, name=f"{concept}_pivotal",
                    data_root=str(images), embedding_manager_ckpt=str(emb), logdir=str(root / "logs"),
                    seed=opt.seed, no_test=True, datadir_in_name=False, trainer={"max_steps": opt.pivot_steps},
                    attention="math",
                    overrides=[f"model.params.model_lr={opt.model_lr}",
                               "lightning.callbacks.image_logger.params.disabled=true"])
        from ldm.modules.embedding_formats import read_embeddings

        a, b = read_embeddings(emb).vectors["*"], read_embeddings(run.embeddings).vectors["*"]
        if not torch.equal(a, b):
            raise RuntimeError("stage 2 moved the pivot word")
        export_model(run.last_ckpt, model_file, f"toy pivotal tuning, {concept}")
    return emb, model_file, items


def reconstruction(opt, model, scorer, items) -> tuple[dict, dict]:
    from ddim_inversion import invert_images, read_image

    images = torch.stack([read_image(p, (32, 32)) for p, _ in items])
    res = invert_images(model, images, PROMPT, [e.template.format("*") for e in EDITS], opt.scales,
                        opt.ddim_steps, seed=opt.seed)
    want = [a for _, a in items]
    out = {}
    for s, r in res["scales"].items():
        sc = scorer.score(r["rec"])
        agree = {k: [sc[k]["value"][i] == want[i][k] for i in range(len(want))] for k in ATTRIBUTE_VALUES}
        shape_colour = [a and b for a, b in zip(agree["shape"], agree["color"], strict=True)]
        edits = {}
        for e, img in zip(EDITS, r["edits"], strict=True):
            se = scorer.score(img)
            concept = [v == want[0]["shape"] for v in se["shape"]["value"]]
            ok = [v == e.value for v in se[e.attribute]["value"]]
            edits[e.template.format("*")] = {"concept": float(np.mean(concept)), "edit": float(np.mean(ok)),
                                             "joint": float(np.mean([a and b for a, b in zip(concept, ok)]))}
        out[f"{s:g}"] = {
            "agreement": {k: float(np.mean(v)) for k, v in agree.items()},
            "same_shape_and_colour": int(sum(shape_colour)), "of": len(want),
            "scored_shapes": list(sc["shape"]["value"]),
            "latent_mse": float((r["z_rec"] - res["z0"]).pow(2).mean()),
            "pixel_mse": float((r["rec"] - images).pow(2).mean()),
            "edits_from_inverted_noise": edits,
        }
    tiles = []
    for s in opt.scales:
        r = res["scales"][s]
        for i in range(len(items)):
            tiles.append(torch.stack([images[i], r["rec"][i], *(e[i] for e in r["edits"])]))
    return out, {"tiles": torch.cat(tiles), "cols": 2 + len(EDITS)}


def editability(opt, model, scorer, shape: str) -> dict:
    out = {}
    for scale in opt.sample_scales:
        rates = {}
        for p_i, e in enumerate([None, *EDITS]):
            prompt = PROMPT if e is None else e.template.format("*")
            sc = scorer.score(gates.sample(model, opt.samples * [prompt], seed=opt.seed * 1009 + p_i, scale=scale))
            concept = [v == shape for v in sc["shape"]["value"]]
            rates[prompt] = {"concept": float(np.mean(concept))}
            if e is not None:
                ok = [v == e.value for v in sc[e.attribute]["value"]]
                rates[prompt].update(edit=float(np.mean(ok)),
                                     joint=float(np.mean([a and b for a, b in zip(concept, ok, strict=True)])))
        out[f"{scale:g}"] = rates
    return out


def run(opt, overrides):
    if overrides:
        raise ValueError(f"unexpected arguments: {overrides}")
    out = Path(opt.out)
    report_path = out / "appendix_e.json"
    if opt.table:
        print(table(json.loads(report_path.read_text())))
        return
    out.mkdir(parents=True, exist_ok=True)
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["settings"] = {k: v for k, v in vars(opt).items() if k not in ("out", "assets", "table")}
    scorer = load_scorer(opt.scorer)
    for concept in opt.concepts:
        root = out / concept
        torch.set_grad_enabled(True)
        emb, model_file, items = train_words(opt, concept, root)
        torch.set_grad_enabled(False)
        for kind, ckpt in (("plain", opt.ckpt), ("pivotal", str(model_file))):
            key = f"{concept}/{kind}"
            if key in report and all(k in report[key] for k in ("reconstruction", "editability")):
                continue
            model = load_model("configs/toy/invert.yaml", ckpt)  # "math": sdpa is ~5x slower on these CPUs
            model.embedding_manager.load(emb)
            t0 = time.time()
            rec, grid = reconstruction(opt, model, scorer, items)
            print(f"{key}: reconstruction {time.time() - t0:.0f}s", flush=True)
            torch.manual_seed(opt.seed)
            report[key] = {"reconstruction": rec, "editability": editability(opt, model, scorer, concept)}
            print(f"{key}: editability {time.time() - t0:.0f}s", flush=True)
            png = make_grid((grid["tiles"] + 1) / 2, nrow=grid["cols"])
            for folder in filter(None, (out, opt.assets)):
                Path(folder).mkdir(parents=True, exist_ok=True)
                save_image(to_uint8(png), Path(folder) / f"{concept}_{kind}.png",
                           text={"rows": f"scales {opt.scales} x 5 training images",
                                 "columns": json.dumps(["input", "reconstruction",
                                                        *(e.template.format("*") for e in EDITS)])})
            atomic_write(report_path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
            r1 = rec[f"{opt.scales[0]:g}"]
            print(f"{key}: scale {opt.scales[0]:g} same shape+colour {r1['same_shape_and_colour']}/5; "
                  f"editability {json.dumps(report[key]['editability'])}", flush=True)
    print(f"wrote {report_path}")


if __name__ == "__main__":
    sys.exit(run_script("appendix_e_toy.py", parser(), run))
