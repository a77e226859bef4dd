"""A run that talks (issue 13): progress lines within an epoch, images/s with useful precision, log lines
for the file only, and the end-of-run report of where the files went."""
import logging
import os

import pytest

import runs
import utils


class Clock:
    def __init__(self):
        self.now = 100.

    def __call__(self):
        return self.now


def lines(caplog):
    return [r.getMessage() for r in caplog.records]


@pytest.fixture
def logger(caplog):
    log = logging.getLogger('test_progress')
    log.propagate = True
    caplog.set_level(logging.INFO, logger='test_progress')
    return log


def test_progress_prints_the_first_step_then_every_n_steps_or_30_seconds(logger, caplog):
    clock = Clock()
    progress = utils.Progress(10, 4, logger, prefix='epoch 1 ', clock=clock)
    steps_logged = []
    for i, seconds in enumerate([2, 1, 1, 1, 40, 1, 1, 1, 1, 1]):  # step 5 takes 40 s
        clock.now += seconds
        before = len(caplog.records)
        progress.step(i, 8, f'loss {i}')
        if len(caplog.records) > before:
            steps_logged.append(i + 1)
    # step 1 at once; step 4 (every 4); step 5 (30 s since the last line); step 8 (4 steps); step 10 (the last)
    assert steps_logged == [1, 4, 5, 8, 10]
    first, *_, last = lines(caplog)
    assert first == 'epoch 1 step 1/10  4.00 img/s  0m18s left  loss 0'  # 8 images in 2 s; 9 steps at 2 s
    assert last == 'epoch 1 step 10/10  1.60 img/s  took 0m50s  loss 9'


def test_progress_with_report_freq_0_is_silent(logger, caplog):
    progress = utils.Progress(3, 0, logger, clock=Clock())
    for i in range(3):
        progress.step(i, 8)
    assert not caplog.records


@pytest.mark.parametrize('value, text', [(12345.6, '12346'), (512.4, '512'), (56.78, '56.8'), (3.14159, '3.14'),
                                         (0.012345, '0.0123'), (0., '0')])
def test_format_sig_keeps_three_significant_digits(value, text):
    assert utils.format_sig(value) == text


def test_file_only_lines_go_to_log_txt_not_to_the_terminal(tmp_path, capsys):
    log = runs.get_logger(str(tmp_path), 'file_only_test')
    log.info('summary line')
    log.info('a long table', extra=runs.FILE_ONLY)
    for h in log.handlers:
        h.flush()
    out = capsys.readouterr().out
    assert 'summary line' in out and 'a long table' not in out
    text = (tmp_path / 'log.txt').read_text()
    assert 'summary line' in text and 'a long table' in text


def test_report_run_names_the_files_that_exist_and_the_next_command(tmp_path, logger, caplog):
    (tmp_path / 'log.txt').write_text('x')
    runs.report_run(logger, str(tmp_path), [('log.txt', 'the log'), ('checkpoint.pt', 'never written')],
                     ['python visualize.py X'], started=0.)
    text = '\n'.join(lines(caplog))
    assert f'its files, in {tmp_path}' in text and 'the log' in text and 'never written' not in text
    assert 'next: python visualize.py X' in text and 'wall time' in text
    assert os.path.exists(tmp_path / 'log.txt')
