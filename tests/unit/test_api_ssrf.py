"""--fetch-urls cannot be aimed at this host's own network: every refused address is
refused before a request leaves, literal or resolved, directly or through a redirect."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from genworker.api.openai import ImageHandler, make_session
from genworker.api.ssrf import AddressPolicy, AddressRefused, GuardedResolver, blocked, check_url
from genworker.config import ConfigError, Settings
from genworker.model import Job, JobError, PermanentError
from genworker.sim.server import tiny_png

REFUSED = "image download refused: address not allowed"


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "169.254.1.1",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
    ],
)
def test_internal_addresses_are_blocked(address: str) -> None:
    assert blocked(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert not blocked(ipaddress.ip_address(address))


def test_the_allow_list_takes_names_addresses_ports_and_cidrs() -> None:
    policy = AddressPolicy("images.internal, 10.0.0.0/8, 127.0.0.1:9000, [::1]:9001, Gw:81")
    loop4, loop6 = ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")
    assert policy.address_allowed("images.internal", 443, ipaddress.ip_address("192.168.0.9"))
    assert policy.address_allowed("x", 80, ipaddress.ip_address("10.9.9.9"))
    assert policy.address_allowed("127.0.0.1", 9000, loop4)
    assert not policy.address_allowed("127.0.0.1", 9002, loop4)  # another port, refused
    assert policy.address_allowed("::1", 9001, loop6)
    assert policy.address_allowed("gw", 81, loop4)
    assert not policy.address_allowed("gw", 80, loop4)
    assert not policy.address_allowed("elsewhere", 80, loop4)


@pytest.mark.parametrize("entry", ["a b", "host:port", "1.2.3.4:99999", "[::1]x", "a/b"])
def test_a_bad_allow_entry_is_a_config_error(entry: str) -> None:
    with pytest.raises(ConfigError, match="--fetch-allow"):
        AddressPolicy(entry)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1/", "http://[::1]:8080/x", "http://169.254.169.254/latest/"]
)
def test_literal_ips_are_checked_before_any_request(url: str) -> None:
    with pytest.raises(AddressRefused):
        check_url(url, AddressPolicy())


class FakeDns(AbstractResolver):
    """Answers every name with the given address (a rebinding DNS server, say)."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        fam = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        return [
            {"hostname": host, "host": self.address, "port": port, "family": fam}
            | {"proto": 0, "flags": 0}
        ]

    async def close(self) -> None:
        return None


def test_a_name_that_resolves_inward_is_refused_at_connect_time() -> None:
    async def main() -> None:
        inward = GuardedResolver(AddressPolicy(), FakeDns("127.0.0.1"))
        with pytest.raises(AddressRefused):
            await inward.resolve("cdn.example", 443)
        outward = GuardedResolver(AddressPolicy(), FakeDns("93.184.216.34"))
        assert [r["host"] for r in await outward.resolve("cdn.example", 443)] == ["93.184.216.34"]

    asyncio.run(main())


# ---------------------------------------------- the image client, end to end

Scenario = Callable[[str, "Servers"], Awaitable[Any]]


class Servers:
    """A fake provider answering a url, and image hosts counting the GETs they get."""

    def __init__(self) -> None:
        self.gets: dict[str, int] = {}
        self.image_url = ""
        self.runners: list[web.AppRunner] = []

    async def serve(self, app: web.Application) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        return int(runner.addresses[0][1])

    def counting(self, name: str, handler: Callable[[web.Request], Any]) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.gets[name] = self.gets.get(name, 0) + 1
            return await handler(request)

        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        return app

    async def provider(self) -> str:
        async def answer(request: web.Request) -> web.Response:
            return web.json_response({"created": 1, "data": [{"url": self.image_url}]})

        app = web.Application()
        app.router.add_post("/v1/images/generations", answer)
        return f"http://127.0.0.1:{await self.serve(app)}"


async def image(request: web.Request) -> web.Response:
    return web.Response(body=tiny_png(b"x"), content_type="image/png")


def fetch(
    tmp_path: Path, target: str, allow: str = "", redirect_to: str = ""
) -> tuple[Any, Servers]:
    """Ask for one image whose url is `target` ({img} = the image host, {hop} = a host that
    redirects to `redirect_to`); returns the result or the JobError, and the servers."""

    async def main() -> tuple[Any, Servers]:
        servers = Servers()
        try:
            img = await servers.serve(servers.counting("img", image))

            async def hop_to(request: web.Request) -> web.Response:
                if request.path == "/a.png":
                    return await image(request)
                raise web.HTTPFound(redirect_to.format(img=img))

            hop = await servers.serve(servers.counting("hop", hop_to))
            api = await servers.provider()
            servers.image_url = target.format(img=img, hop=hop)
            s = Settings(
                api_url=api,
                output_dir=tmp_path,
                fetch_urls=True,
                fetch_allow=allow.format(img=img, hop=hop),
                response_format="url",
                model="dall-e-3",
                request_timeout_s=2.0,
            )
            handler = ImageHandler(s)
            try:
                async with make_session(s) as session:
                    job = Job(1, 1, 1, 0, "image", {"prompt": "p", "model": "dall-e-3"}, 1)
                    try:
                        return await handler(job, session), servers
                    except JobError as e:
                        return e, servers
            finally:
                await handler.close()
        finally:
            for runner in servers.runners:
                await runner.cleanup()

    return asyncio.run(main())


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{img}/a.png",
        "http://localhost:{img}/a.png",
        "http://[::1]:{img}/a.png",
        "http://10.0.0.1/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0:{img}/a.png",
    ],
)
def test_internal_image_urls_are_refused_without_a_request(tmp_path: Path, target: str) -> None:
    err, servers = fetch(tmp_path, target)
    assert isinstance(err, PermanentError)
    assert err.reason == REFUSED
    assert servers.gets == {}


def test_an_allowed_host_is_fetched(tmp_path: Path) -> None:
    result, servers = fetch(tmp_path, "http://127.0.0.1:{img}/a.png", allow="127.0.0.1:{img}")
    assert result["mime"] == "image/png"
    assert servers.gets == {"img": 1}


def test_a_redirect_from_an_allowed_host_to_another_is_not_followed(tmp_path: Path) -> None:
    err, servers = fetch(
        tmp_path,
        "http://127.0.0.1:{hop}/start.png",
        allow="127.0.0.1:{hop}",
        redirect_to="http://127.0.0.1:{img}/a.png",
    )
    assert isinstance(err, PermanentError)
    assert err.reason.startswith("image download refused")
    assert "127.0.0.1" not in err.reason
    assert servers.gets == {"hop": 1}


def test_a_same_host_redirect_is_followed(tmp_path: Path) -> None:
    result, servers = fetch(
        tmp_path, "http://127.0.0.1:{hop}/old.png", allow="127.0.0.1:{hop}", redirect_to="/a.png"
    )
    assert result["mime"] == "image/png"
    assert servers.gets == {"hop": 2}


def test_a_redirect_to_a_port_past_65535_is_refused_not_retried() -> None:
    from genworker.api.download import _origin

    with pytest.raises(PermanentError) as caught:
        _origin("http://127.0.0.1:99999/a.png")  # a Location header a provider may send
    assert caught.value.reason == "image download refused: bad redirect"
