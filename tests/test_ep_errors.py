"""Bad input raises clear errors on every rank; disagreeing ranks get an error, not a hang."""

import pytest

import ep_error_cases
from ep_backends import EP_BACKENDS


@pytest.mark.parametrize("backend", EP_BACKENDS)
def test_bad_inputs_raise(clusters, backend):
    clusters(2).run(ep_error_cases.check_bad_inputs, backend)


@pytest.mark.parametrize("backend", EP_BACKENDS)
def test_ranks_that_disagree_get_an_error(clusters, backend):
    clusters(2).run(ep_error_cases.check_ranks_disagree, backend)
