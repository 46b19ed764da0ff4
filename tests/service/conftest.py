from ..rest.conftest import client, make_client  # noqa: F401  (the app driven through httpx)
