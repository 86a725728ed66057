"""Is a proxy instance fit to serve? A real tile request through it, to the job's own source.

An instance counts as healthy only when the proxy accepts the job's credentials, reaches the
source, and brings back an image (HTTP 200): exactly what the consumers will ask of it. Nothing
here logs or returns the credentials, not even inside an error message.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

import requests

# Magic numbers of the image formats tile servers send.
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"RIFF")


def proxy_url_with_credentials(proxy_url: str, username: str, password: str) -> str:
    parts = urlsplit(proxy_url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme or 'http'}://{quote(username, safe='')}:{quote(password, safe='')}@{host}{port}"


def looks_like_image(content_type: str, body: bytes) -> bool:
    if not body:
        return False
    return content_type.split(";")[0].strip().lower().startswith("image/") or body.startswith(IMAGE_SIGNATURES)


def _scrub(text: str, *secrets: str) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***").replace(quote(secret, safe=""), "***")
    return text


def check_proxy(
    *, proxy_url: str, username: str, password: str, probe_url: str, timeout: float = 10.0
) -> tuple[bool, str]:
    """(ok, detail): ok only when GET probe_url through the proxy answers 200 with an image.

    proxy_url is http://host:port without credentials (as the ConfigMap carries it); probe_url
    is one tile of the job's source.
    """
    proxy = proxy_url_with_credentials(proxy_url, username, password)
    session = requests.Session()
    session.trust_env = False  # no proxy or NO_PROXY from the environment: only this one
    try:
        response = session.get(
            probe_url,
            proxies={"http": proxy, "https": proxy},
            timeout=timeout,
            allow_redirects=False,  # a redirect is no tile
            headers={"User-Agent": "tilehopper-health"},
        )
        body = response.content
    except requests.RequestException as exc:
        return False, _scrub(f"request through {proxy_url} failed: {type(exc).__name__}: {exc}", username, password)
    finally:
        session.close()
    status = response.status_code
    if status in (401, 407):  # tinyproxy answers 407 without credentials, 401 for wrong ones
        return False, f"credentials refused ({status}) through {proxy_url}"
    if status != 200:
        return False, f"source answered {status} through {proxy_url}"
    content_type = response.headers.get("Content-Type", "")
    if not looks_like_image(content_type, body):
        return False, f"source answered 200 but no image ({content_type or 'no content type'}, {len(body)} bytes)"
    return True, f"200 {content_type or 'image'} {len(body)} bytes through {proxy_url}"
