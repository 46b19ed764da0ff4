"""/docs and /redoc load every script, style and icon from the server itself: nothing from a CDN."""

import re
from urllib.parse import urljoin, urlparse

import httpx
import pytest


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_page_needs_nothing_but_the_server(live_server, page):
    with httpx.Client(base_url=live_server.http_url, timeout=30) as http:
        res = http.get(page)
        assert res.status_code == 200 and "text/html" in res.headers["content-type"]
        refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]+)['"]""", res.text)
        refs += re.findall(r"""url:\s*['"]([^'"]+)['"]""", res.text)  # the OpenAPI document Swagger UI fetches
        refs += re.findall(r"""spec-url\s*=\s*['"]([^'"]+)['"]""", res.text)
        assert refs, res.text
        base = live_server.http_url + page
        scripts = []
        for ref in refs:
            url = urlparse(urljoin(base, ref))
            assert url.netloc == urlparse(live_server.http_url).netloc, f"{page} loads {ref} from elsewhere"
            got = http.get(url.path)
            assert got.status_code == 200 and got.content, (ref, got.status_code)
            if url.path.endswith(".js"):
                scripts.append(got.text)
        assert scripts, refs
    if page == "/docs":
        # FastAPI writes OpenAPI 3.1, which Swagger UI renders from version 5 on
        assert "isOAS31" in scripts[0]
