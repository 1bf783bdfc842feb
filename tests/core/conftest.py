"""Every core test runs against both implementations, as aio-libs' multidict/yarl do."""

import pytest

from core_ext.implementations import IMPLEMENTATIONS


@pytest.fixture(scope="session", params=sorted(IMPLEMENTATIONS))
def Selector(request):
    return IMPLEMENTATIONS[request.param]


@pytest.fixture(scope="session")
def make(Selector):
    """Build a selector from {id: weight} (insertion order is nginx's peer order)."""

    def build(weights=None, **watermarks):
        selector = Selector(**watermarks)
        for nid, weight in (weights or {}).items():
            selector.add(nid, weight)
        return selector

    return build
