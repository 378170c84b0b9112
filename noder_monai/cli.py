"""The ``noder`` command: fit, predict, evaluate, run the demo, pretrain the autoencoder.

Parsing and printing only: every verb calls one function of :mod:`noder_monai.workflows` (or
:func:`noder_monai.engines.pretrain_autoencoder`). The verbs are the user's words for the stages
(:mod:`noder_monai.workflows.stages`): ``noder fit`` runs training (``bundle/configs/train.json``'s trainer and
handlers, once per subject), ``noder predict`` inference (the predictions ``inference.json`` writes) and ``noder
evaluate`` evaluation.
``noder <verb> --help`` explains the verb's arguments. Examples::

    noder demo
    noder fit data/datalist.json --output_dir runs --epochs 100 --threads 2
    noder predict data/datalist.json --output_dir runs --times "[1.0, 2.5, 8.0]"
    noder evaluate data/datalist.json --output_dir runs --eval_dir runs/eval
    noder pretrain runs/autoencoder --epochs 5
    torchrun --nproc_per_node=2 -m noder_monai.cli fit data/datalist.json --output_dir runs

Under ``torchrun`` each process takes a cost-balanced share of the subjects (:mod:`noder_monai.workflows.cohort`);
finished subjects are skipped on a rerun; a failing subject is recorded and the exit status is the number that
failed. A rank that waits for another gives up after ``$NODER_RANK_TIMEOUT_S`` seconds (default 1800) without a sign
of life from it, naming it (:mod:`noder_monai.workflows.gather`). A run that stops on an error (a bad argument, an
unwritable output folder, a lost rank) prints ``noder <verb>: error: <message>`` and exits with 101; nothing is
written before every argument and the output folder are checked. The one-letter flags ``--help`` shows (``-o`` for
``--output_dir``) work as their long names.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import time as timer
from collections import Counter
from typing import Any, Sequence

import fire

from noder_monai import workflows
from noder_monai.data.inputs import inputs_datalist, write_inputs_datalist
from noder_monai.engines import pretrain_autoencoder
from noder_monai.io import parse_times
from noder_monai.reporting.tables import comparison_table, markdown_table
from noder_monai.utils import resolve_device, set_threads

__all__ = ["COMMANDS", "ERROR_EXIT_CODE", "console_main", "demo", "evaluate", "expand_short_flags", "fit",
           "group_list_flags", "main", "predict", "pretrain", "report", "short_flags"]


def _print_index(output_dir: str, datalist: str | None, eval_dir: str | None = None, device: str | None = None) -> None:
    """Write the HTML report (each rank its share of the pages) and print the index's path on rank 0."""
    index = workflows.cohort_report(output_dir, datalist, eval_dir, device or "cpu")["index"]
    if index is not None:
        print(f"report:      {index}")
    workflows.exit_status("report", {})


def _status_line(record: dict) -> str:
    return f"{record.get('status')}" + (f": {record['error']}" if record.get("error") else "")


def _exit_on_failures(records: dict, stage: str) -> None:
    """Exit with :func:`~noder_monai.workflows.exit_status` (the number of failed subjects on rank 0, once every
    rank finished) when it is not 0, naming the failed subjects."""
    code = workflows.exit_status(stage, records)
    if code:
        failed = [k for k, v in records.items() if v.get("status") == "failed"]
        print(f"{len(failed)} subject(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(code)


def evaluate(
    datalist: str,
    dataset_dir: str | None = None,
    output_dir: str = "noder_outputs",
    eval_dir: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    montage: bool = True,
    report: bool = True,
) -> None:
    """Score every fitted subject on its held-out scans (NRMSE, SSIM, PSNR, % folded voxels) and print the table.

    Needs `noder fit` with the same output_dir first and "heldout" scans in the datalist. Writes metrics.json,
    metrics.md and one <id>_montage.png per subject (rows: held-out times; columns: observed, predicted,
    predicted - observed in blue/white/red) to eval_dir.

    Args:
        datalist: the datalist used for fitting, with "heldout" scans.
        dataset_dir: folder the datalist's relative paths start from (default: the datalist's folder).
        output_dir: the folder `noder fit` wrote to.
        eval_dir: where the report is written (default: <output_dir>/eval).
        device: torch device (default: cuda if available, else cpu).
        threads: torch CPU threads (default: the cores idle at start, i.e. cores minus the load average).
        montage: write the PNG montages (--nomontage to skip).
        report: write the HTML report (<output_dir>/<id>/report.html and the index <output_dir>/report.html;
            --noreport to skip).
    """
    eval_dir = eval_dir or os.path.join(output_dir, "eval")
    write_report = report
    report = workflows.evaluate(
        datalist=datalist, dataset_dir=dataset_dir, output_dir=output_dir, eval_dir=eval_dir, device=device,
        num_threads=threads, montage=montage,
    )
    if "overall" in report:  # rank 0 (or a single process): the cohort table
        print(markdown_table(report))
        print(f"report: {os.path.join(os.path.abspath(eval_dir), 'metrics.json')}")
    if write_report:
        _print_index(output_dir, datalist, eval_dir, device)
    _exit_on_failures({subject: {"status": "failed"} for subject in report["failed"]}, "evaluation")


def demo(
    directory: str = "noder_demo",
    full: bool = False,
    subjects: int | None = None,
    size: int | None = None,
    pretrained: str | None = "auto",
    device: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    report: bool = True,
    **settings: Any,
) -> None:
    """Run everything on the synthetic demo: make the data (if absent), fit, predict, evaluate, print the metrics.

    The demo subjects are the shipped Colin27 head deformed by a known, non-linear atrophy-like trajectory, with
    three held-out scans each (two between visits, one after the last). By default one 48^3 subject with 160 epochs
    (about a minute on 2 CPU cores); --full runs two 64^3 subjects with the default 300 epochs (a few minutes).
    Prints the held-out table (NODER beside the nearest observed scan and linear interpolation) once and writes the
    HTML report.

    Args:
        directory: folder for data/, outputs/ and eval/.
        full: the full-size demo (two 64^3 subjects, 300 epochs).
        subjects: number of demo subjects (default 1; 2 with --full).
        size: edge of the demo volumes in voxels (default 48; 64, the shipped resolution, with --full).
        pretrained: autoencoder file, "auto" (shipped weights when installed) or None (random weights).
        device: torch device (default: cuda if available, else cpu).
        threads: torch CPU threads (default: the cores idle now, sampled at start; 1 on a busy machine).
        progress: show a progress bar when the output is a terminal.
        report: write the HTML report (--noreport to skip).
        settings: fit and network settings as for `noder fit`, e.g. --epochs 100.
    """
    if not full:
        settings.setdefault("epochs", _DEMO_QUICK["epochs"])
    subjects = subjects or (2 if full else _DEMO_QUICK["subjects"])
    size = size or (64 if full else _DEMO_QUICK["size"])
    fit_settings, network = workflows.split_settings(**settings)
    result = workflows.run_demo(
        directory=directory, n_subjects=subjects, size=size, network=network, fit=fit_settings,
        pretrained=pretrained, device=device, num_threads=threads, progress=progress,
    )
    if report:
        start = timer.perf_counter()
        written = workflows.cohort_report(result["output_dir"], result["datalist"], result["eval_dir"], device or "cpu")
        result["seconds"]["report"] = round(timer.perf_counter() - start, 2)
        print("held-out scans, mean per split (NODER against two baselines that move no anatomy):")
        print(comparison_table(written["comparison"]))
    else:
        print(result["table"])
    print(f"data:        {result['datalist']}")
    print(f"models:      {result['output_dir']}/<subject>/model.pt")
    print(f"predictions: {result['output_dir']}/<subject>/predictions/")
    print(f"metrics:     {result['eval_dir']}/metrics.md (per scan: NRMSE, SSIM, PSNR, % folded)")
    if report:
        print(f"report:      {written['index']} (open in a browser)")
    print("seconds:     " + ", ".join(f"{stage} {value:.1f}" for stage, value in result["seconds"].items()))


def pretrain(
    output_dir: str,
    fields: str | None = None,
    device: str | None = None,
    resume: bool = True,
    progress: bool = True,
    **settings: Any,
) -> None:
    """Pretrain the deformation autoencoder that NODER's encoder/decoder start from.

    Writes autoencoder.pt (best validation weights; pass it to `noder fit --pretrained`), checkpoint.pt and
    history.json to output_dir. See bundle/docs/pretraining.md.

    Args:
        output_dir: folder of the weights, checkpoint and history.
        fields: None trains on generated smooth fields; or your displacement fields (a folder of NIfTI files, a
            JSON datalist {"training": [...], "validation": [...]}, or a list of files).
        device: torch device (default: cuda if available, else cpu).
        resume: continue from output_dir/checkpoint.pt if it exists (--noresume starts again).
        progress: show a progress bar.
        settings: PretrainConfig fields, e.g. --epochs 30 --spatial_dims 3 --spatial_size 32 --batch_size 8.
    """
    result = pretrain_autoencoder(
        output_dir, fields=fields, device=resolve_device(device), resume=resume, progress=progress, **settings
    )
    print(f"autoencoder: {result.autoencoder} (epoch {result.best_epoch}, validation endpoint error "
          f"{result.best_validation_epe:.4f} voxels)")


_DEMO_QUICK = {"subjects": 1, "size": 48, "epochs": 160}
"""The default demo: one 48^3 subject, 160 epochs, sized for about a minute on 2 CPU cores with NODER's held-out
NRMSE ahead of both baselines (``benchmarks/README.md``); ``noder demo --full``: two 64^3 subjects, 300 epochs."""


def _resolve_inputs(inputs: Sequence[str], output_dir: str, times: Any, bids: str | None,
                    participant_label: Any, time_column: str, subject: str | None) -> str | dict[str, Any]:
    """The datalist path, or the datalist document (not yet written) for scans, cine and BIDS inputs; reads and
    checks only."""
    if not inputs and bids is None:
        existing = os.path.join(output_dir, "datalist.json")
        if os.path.isfile(existing):
            return existing
        raise ValueError(f"no inputs given and no {existing} (fit writes it for scans, cine and BIDS inputs, not for "
                         f"a datalist of your own): pass the datalist or scans you fitted, e.g. "
                         f"`noder predict data/datalist.json --output_dir {output_dir} --times 1.5`.")
    return inputs_datalist([str(i) for i in inputs], output_dir, times, bids, participant_label, time_column, subject)


def _write_inputs(resolved: str | dict[str, Any], output_dir: str) -> str:
    """After the output folder is checked: write the datalist document (and a cine's frames); return its path."""
    output_dir = workflows.prepare_output_dir(output_dir)
    if isinstance(resolved, str):
        return resolved
    path = write_inputs_datalist(resolved, output_dir)
    print(f"datalist:    {path} ({len(resolved['subjects'])} subject(s); the bundle reruns it with --datalist)")
    return path


def fit(
    *inputs: str,
    times: Any = None,
    bids: str | None = None, participant_label: Any = None, time_column: str = "age",  # a BIDS dataset
    subject: str | None = None,
    dataset_dir: str | None = None,
    output_dir: str = "noder_outputs",
    pretrained: str | None = "auto",
    device: str | None = None,
    seed: int = 0,
    threads: int | None = None,
    skip_existing: bool = False,
    progress: bool = True,
    report: bool = True,
    **settings: Any,
) -> None:
    """Fit a NODER trajectory to every subject: your scans, a 4D cine file, a BIDS dataset or a JSON datalist.

        noder fit t0.nii.gz t1.nii.gz t2.nii.gz --times 0 1.5 3       one subject, one time per scan
        noder fit cine.nii.gz                                          4D file: frame times from its header (s)
        noder fit --bids /data/bids --participant_label 01 02 --time_column age
        noder fit DATALIST.json

    Scans, cine and BIDS inputs are written as the bundle's datalist to <output_dir>/datalist.json (rerun it with
    the bundle's --datalist, or with `noder predict --output_dir` alone). BIDS is read as a plain folder layout (no
    pybids): sub-*/ses-*/anat/sub-*_ses-*_T1w.nii[.gz], times from sub-*/sub-*_sessions.tsv. Writes per subject
    <output_dir>/<id>/model.pt (the fitted subject), loss.csv and loss.json (the loss per epoch),
    fitted/image_t<time>.nii.gz and, with --report, report.html (figures, no held-out metrics until evaluate).

    Args:
        inputs: a JSON datalist ({"subjects": [{"id", "scans": [{"image", "time"}, ...], "label"?, "heldout"?,
            "predict_times"?}]}), one 4D cine file, or two or more scan files of one subject (with --times).
        times: one acquisition time per scan file, e.g. --times 0 1.5 3; for a cine file, the frame times (default:
            k * pixdim[4] from its header, in seconds).
        bids: a BIDS dataset folder: one subject per sub-*, one scan per ses-* (T1w).
        participant_label: BIDS subjects to fit, with or without "sub-" (default: all).
        time_column: column of sub-*_sessions.tsv holding each session's time (default: age).
        subject: subject id for scan files or a cine file (default: sub-01, or the cine file's name).
        dataset_dir: folder the datalist's relative paths start from (default: the datalist's folder).
        output_dir: where the per-subject folders are written.
        pretrained: deformation-autoencoder file for the encoder/decoder; "auto" uses the weights shipped with
            the package when installed; None starts from random weights.
        device: torch device, e.g. cpu or cuda:0 (default: cuda if available, else cpu).
        seed: random seed of every fit.
        threads: torch CPU threads (default: the cores idle now, sampled at start; 1 on a busy machine).
        skip_existing: also keep subjects whose model.pt exists without a done-marker (older outputs); subjects
            with a done-marker for the same settings and scans are always skipped, so a rerun resumes.
        progress: show a progress bar (subject i of N, level, loss) when the output is a terminal.
        report: write each subject's report.html and the index <output_dir>/report.html (--noreport to skip).
        settings: fit settings (epochs, learning_rate, ncc_kernel_size, smoothness_weight, boundary_weight,
            levels, level_fractions, patience, min_improvement, finetune_decoder, source, image_smoothing_sigma,
            finest_time_groups, similarity_voxels) and network settings (latent_channels, encoder_channels,
            decoder_channels, dynamics_channels, hidden_features, num_hidden_layers, smoothing_kernel, step_size,
            adjoint, field, integration_steps),
            e.g. --epochs 100 --levels "[2,1]" --level_fractions "[0.5,0.5]".
    """
    fit_settings, network = workflows.split_settings(**settings)  # every argument checked before any write
    workflows.check_pretrained(pretrained)
    resolved = _resolve_inputs(inputs, output_dir, times, bids, participant_label, time_column, subject)
    datalist = _write_inputs(resolved, output_dir)
    summary = workflows.train(
        datalist=datalist, dataset_dir=dataset_dir, output_dir=output_dir, network=network, fit=fit_settings,
        pretrained=pretrained, device=device, seed=seed, num_threads=threads, skip_existing=skip_existing,
        progress=progress,
    )
    for name, record in summary.items():
        if record.get("status") in ("done", "skipped") and "epochs" in record:
            print(f"{name}: {record['epochs']} epochs, final loss {record['final_loss']:.5f}, {record['seconds']:.1f} s"
                  f" -> {record['model']}" + (" (finished earlier)" if record["status"] == "skipped" else "")
                  + (f"; {record['appearance']}" if record.get("appearance") else ""))
        else:
            print(f"{name}: {_status_line(record)}")
    print(f"outputs: {os.path.abspath(output_dir)}")
    if report:  # failed subjects are listed as not fitted; the others get their pages
        _print_index(output_dir, datalist)
    _exit_on_failures(summary, "training")


def predict(
    *inputs: str,
    times: Any = None,
    scan_times: Any = None,
    bids: str | None = None, participant_label: Any = None, time_column: str = "age",  # a BIDS dataset
    subject: str | None = None,
    dataset_dir: str | None = None,
    output_dir: str = "noder_outputs",
    device: str | None = None,
    threads: int | None = None,
    batch_size: int = 8,
    uncertainty: bool = False,
) -> None:
    """Predict every fitted subject at query times: images, displacement fields, Jacobian maps, carried labels.

        noder predict --output_dir runs --times 1 2.5 8          the subjects `noder fit` wrote to runs/
        noder predict DATALIST.json --output_dir runs --times "[1.0, 2.5]"
        noder predict --output_dir runs --times 1 8 --uncertainty     with calibrated standard deviation maps

    Needs `noder fit` with the same output_dir first. Inputs are read as for `noder fit` (with the scans' times as
    --scan_times, since --times are the query times); with none, <output_dir>/datalist.json (written by fit) is
    used. Writes <output_dir>/<id>/predictions/{image,ddf,jacobian,label}_t<time>.nii.gz (input affine; ddf in
    voxels, channels last with NIfTI intent vector), predictions.json and, when the subject has a label map,
    label_volumes.csv (each structure's volume from the Jacobian determinant integrated over the baseline label map,
    and the carried map's voxel count). With --uncertainty also image_std_t<time>.nii.gz and
    log_jacobian_std_t<time>.nii.gz (predictive standard deviation of the image, input units: image +- 1.645 std is
    the calibrated 90% interval for the noise-free image; and of log det J) and the volumes' 90% band (lower_mm3, upper_mm3); a subject
    whose model.pt holds no uncertainty ensemble gets one fitted first (a few fine-tuned copies of its fit, each
    without one observed scan) and stored in model.pt for later runs.

    Args:
        inputs: the datalist, cine file or scan files used for fitting (default: <output_dir>/datalist.json).
        times: query times, e.g. --times 1 2.5 8, for subjects without their own predict_times in the datalist
            (default: each subject's observed and held-out times).
        scan_times: the scan files' acquisition times when inputs are scan files.
        bids: the BIDS dataset folder used for fitting.
        participant_label: BIDS subjects (default: all).
        time_column: column of sub-*_sessions.tsv holding each session's time (default: age).
        subject: subject id given to `noder fit` for scan files or a cine file.
        dataset_dir: folder the datalist's relative paths start from (default: the datalist's folder).
        output_dir: the folder `noder fit` wrote to.
        device: torch device (default: cuda if available, else cpu).
        threads: torch CPU threads (default: the cores idle now, sampled at start).
        batch_size: time points decoded and warped at once (lower it if memory is short).
        uncertainty: also write the standard deviation maps and the volume bands (see above).
    """
    query = None if times is None else parse_times(times, name="--times")  # every argument checked before any write
    resolved = _resolve_inputs(inputs, output_dir, scan_times, bids, participant_label, time_column, subject)
    datalist = _write_inputs(resolved, output_dir)
    summary = workflows.infer(
        datalist=datalist, dataset_dir=dataset_dir, output_dir=output_dir, predict_times=query, device=device,
        num_threads=threads, batch_size=batch_size, uncertainty=uncertainty,
    )
    for name, record in summary.items():
        if record.get("images"):
            print(f"{name}: {len(record['times'])} time point(s) {record['times']} -> "
                  f"{os.path.dirname(record['images'][0])}"
                  + (f"; {record['uncertainty']}" if record.get("uncertainty") else ""))
        else:
            print(f"{name}: {_status_line(record)}")
    _exit_on_failures(summary, "inference")


def report(
    output_dir: str = "noder_outputs",
    datalist: str | None = None,
    eval_dir: str | None = None,
    device: str | None = None,
    threads: int | None = None,
) -> None:
    """Write the HTML report of a finished run: one self-contained page per subject and an index.

    Each <output_dir>/<id>/report.html shows, per scan time, observed / predicted / difference; the Jacobian
    determinant over the anatomy; each structure's volume over time (with a label map); the loss curve; and the
    held-out metrics beside the nearest observed scan and linear interpolation. Figures are embedded (no external
    files or URLs). The index is <output_dir>/report.html.

    Args:
        output_dir: the folder `noder fit` wrote to.
        datalist: the run's datalist (default: <output_dir>/datalist.json, written by `noder fit` for scans, cine
            and BIDS inputs).
        eval_dir: folder of `noder evaluate`'s outputs, for % folded voxels (default: <output_dir>/eval).
        device: torch device (default: cpu).
        threads: torch CPU threads (default: the cores idle now, sampled at start).

    Under torchrun each process draws its share of the pages and the first writes the index.
    """
    set_threads(threads)
    result = workflows.cohort_report(output_dir, datalist, eval_dir, device or "cpu")
    for subject, page in result["pages"].items():
        print(f"{subject}: {page}")
    if result["index"] is not None:
        print(f"report:      {result['index']}")


COMMANDS = {"fit": fit, "predict": predict, "evaluate": evaluate, "demo": demo, "pretrain": pretrain,
            "report": report}
"""The verbs of the ``noder`` command."""


_LIST_FLAGS = {"--times": "number", "--scan_times": "number", "--scan-times": "number",
               "--participant_label": "text", "--participant-label": "text"}


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def group_list_flags(argv: list[str]) -> list[str]:
    """``--times 0 1.5 3`` -> ``--times "[0, 1.5, 3]"`` and ``--participant_label 01 02`` -> ``['01', '02']``: fire
    takes one value per flag, so the values after a list flag (numbers for times, words not starting with ``-``
    for labels) are joined into one list literal."""
    out: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        kind = _LIST_FLAGS.get(token)
        if kind is None or "--" in argv[:index]:
            out.append(token)
            index += 1
            continue
        values = []
        index += 1
        while index < len(argv) and (_is_number(argv[index]) if kind == "number" else not argv[index].startswith("-")):
            values.append(argv[index])
            index += 1
        if kind == "number" and len(values) <= 1:
            if not values and index < len(argv):  # a list literal such as "[1.0, 2.5]": fire and parse_times read it
                values = [argv[index]]
                index += 1
            out += [token] + values
        elif kind == "number":
            out += [token, "[" + ", ".join(values) + "]"]
        else:
            out += [token, repr([str(v[4:] if v.startswith("sub-") else v) for v in values])]
    return out


def short_flags(function: Any) -> dict[str, str]:
    """``{"o": "output_dir", ...}``: the one-letter flags ``noder <verb> --help`` shows for ``function`` (python-fire's
    rule: a flag's first letter, when no other flag of its group, the parameters with defaults or the keyword-only
    ones, starts with it). ``-h`` stays help."""
    spec = inspect.getfullargspec(function)
    groups = [spec.args[len(spec.args) - len(spec.defaults or ()):], spec.kwonlyargs]
    letters: dict[str, str] = {}
    for group in groups:
        counts = Counter(name[0] for name in group)
        letters.update({name[0]: name for name in group if counts[name[0]] == 1 and name[0] != "h"})
    return letters


_SHORT_FLAG = re.compile(r"^-(?P<letter>[A-Za-z])(?P<value>=.*)?$")


def expand_short_flags(argv: list[str]) -> list[str]:
    """``noder fit ... -o runs`` -> ``... --output_dir runs``: each one-letter flag the verb's help shows
    (:func:`short_flags`) becomes its long name (fire would read it as an unknown setting of ``**settings``)."""
    if not argv or argv[0] not in COMMANDS:
        return list(argv)
    letters = short_flags(COMMANDS[argv[0]])
    out = [argv[0]]
    for index, token in enumerate(argv[1:], start=1):
        match = _SHORT_FLAG.match(token)
        if "--" in argv[:index] or match is None or match["letter"] not in letters:
            out.append(token)
        else:
            out.append(f"--{letters[match['letter']]}{match['value'] or ''}")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Run a verb (``argv`` defaults to ``sys.argv[1:]``); errors propagate (see :func:`console_main`)."""
    argv = group_list_flags(expand_short_flags(list(sys.argv[1:] if argv is None else argv)))
    if "--" not in argv and any(flag in argv for flag in ("-h", "--help")):
        # fire reads `noder fit --help` as a value for **settings; its own spelling is `noder fit -- --help`
        argv = [arg for arg in argv if arg not in ("-h", "--help")] + ["--", "--help"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    logging.getLogger("ignite").setLevel(logging.WARNING)  # one line per epoch; the bar and the summaries say it
    fire.Fire(COMMANDS, command=argv, name="noder")


ERROR_EXIT_CODE = 101
"""Exit status of ``noder`` when a run stops on an error (a bad argument, an unwritable folder, a lost rank); 1 to
100 is the number of failed subjects."""
USER_ERRORS = (ValueError, OSError, TimeoutError)
"""Errors whose message is the whole story (bad input, a file that cannot be written, a lost rank): ``noder`` prints
it as one line; others keep their traceback."""


def console_main(argv: Sequence[str] | None = None) -> None:
    """The ``noder`` console script: :func:`main`, with an error of :data:`USER_ERRORS` printed as one line,
    ``noder <verb>: error: <message>``, and exit status :data:`ERROR_EXIT_CODE` (``NODER_TRACEBACK=1`` shows the
    traceback too)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        main(args)
    except USER_ERRORS as error:
        if os.environ.get("NODER_TRACEBACK"):
            raise
        verb = f"noder {args[0]}" if args and args[0] in COMMANDS else "noder"
        print(f"{verb}: error: {error}", file=sys.stderr)
        sys.exit(ERROR_EXIT_CODE)


if __name__ == "__main__":
    console_main()
