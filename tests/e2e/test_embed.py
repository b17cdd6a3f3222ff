"""POST /embed (TEI's shape) on the generation model's pooled hidden states."""

import math

import httpx


def test_embed_shapes_and_normalisation(client: httpx.Client) -> None:
    one = client.post("/embed", json={"inputs": "What is a list?"})
    assert one.status_code == 200
    vectors = one.json()
    info = client.get("/info").json()
    assert len(vectors) == 1 and len(vectors[0]) == info["embedding_dimensions"]
    assert math.isclose(sum(x * x for x in vectors[0]), 1.0, rel_tol=1e-4)

    many = client.post("/embed", json={"inputs": ["What is a list?", "Tuples are immutable", "x"]}).json()
    assert len(many) == 3
    assert many[0] == vectors[0] or all(
        math.isclose(a, b, abs_tol=1e-5) for a, b in zip(many[0], vectors[0], strict=True)
    )

    raw = client.post("/embed", json={"inputs": "What is a list?", "normalize": False}).json()[0]
    norm = math.sqrt(sum(x * x for x in raw))
    assert not math.isclose(norm, 1.0, rel_tol=1e-3)
    assert all(math.isclose(a / norm, b, abs_tol=1e-5) for a, b in zip(raw, vectors[0], strict=True))


def test_embed_too_long(client: httpx.Client) -> None:
    text = "word " * 1000
    r = client.post("/embed", json={"inputs": text})
    assert r.status_code == 413
    assert r.json()["error_type"] == "validation"
    assert "truncate" in r.json()["error"]
    ok = client.post("/embed", json={"inputs": text, "truncate": True})
    assert ok.status_code == 200


def test_embed_validation(client: httpx.Client) -> None:
    for body in ({"inputs": ""}, {"inputs": []}, {"inputs": 3}, {}):
        r = client.post("/embed", json=body)
        assert r.status_code == 422, body
        assert r.json()["error_type"] == "validation"
    r = client.post("/embed", json={"inputs": ["a"] * 65})
    assert r.status_code == 413
