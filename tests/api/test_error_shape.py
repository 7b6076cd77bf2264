"""Every /api/v1 error is {"detail": "<sentence>", "errors": [...]}; /v2 keeps {"error": ...}."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.api.errors import closest_name


def test_a_typo_d_field_gets_a_sentence_with_did_you_mean_and_the_list_beside_it(client: TestClient) -> None:
    response = client.post("/api/v1/runs", json={"train": {"epochs": 1, "learning_rate": 0.1}})
    assert response.status_code == 422
    body = response.json()
    assert body["detail"] == "body field train.learning_rate is not a known field; did you mean 'lr'?"
    [error] = body["errors"]
    assert (error["loc"], error["type"], error["suggestion"]) == (
        ["body", "train", "learning_rate"],
        "extra_forbidden",
        "lr",
    )


def test_misspellings_are_matched_by_spelling_and_inside_unions(client: TestClient) -> None:
    nested = client.post("/api/v1/runs", json={"model": {"norm": {"kind": "batch", "momentom": 0.1}}})
    assert nested.json()["errors"][0]["suggestion"] == "momentum"
    alias = client.put("/api/v1/models/typo", json={"run_idd": "0" * 32})
    assert "did you mean 'run_id'?" in alias.json()["detail"], alias.json()
    assert closest_name("zzz", ["lr", "epochs"]) is None


def test_many_errors_show_three_sentences_and_list_them_all(client: TestClient) -> None:
    response = client.post("/api/v1/runs", json={"a": 1, "b": 2, "c": 3, "d": 4, "e": 5})
    body = response.json()
    assert len(body["errors"]) == 5
    assert body["detail"].endswith("and 2 more (see errors)")


def test_query_and_path_errors_name_the_parameter(client: TestClient) -> None:
    body = client.get("/api/v1/runs", params={"limit": 0}).json()
    assert body["detail"].startswith("query parameter limit: Input should be greater than or equal to 1")
    assert body["errors"][0]["loc"] == ["query", "limit"]


def test_errors_that_are_not_about_fields_carry_an_empty_list(client: TestClient) -> None:
    missing = client.get(f"/api/v1/runs/{'0' * 32}")
    assert missing.json() == {"detail": f"run {'0' * 32} not found", "errors": []}
    wrong_method = client.put("/api/v1/runs")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["errors"] == []


def test_a_body_without_a_json_content_type_gets_415(client: TestClient) -> None:
    text = client.post(
        "/api/v1/runs", content=b'{"train": {"epochs": 1}}', headers={"content-type": "text/plain"}
    )
    assert text.status_code == 415
    assert "application/json" in text.json()["detail"]
    bare = client.post("/api/v1/runs", content=b"{}", headers={"content-type": ""})
    assert bare.status_code == 415
    schema = client.get("/openapi.json").json()
    assert "415" in schema["paths"]["/api/v1/runs"]["post"]["responses"]


def test_invalid_json_is_one_sentence(client: TestClient) -> None:
    response = client.post("/api/v1/runs", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("the body is not valid JSON")


def test_v2_keeps_the_protocol_error_shape(client: TestClient) -> None:
    response = client.get("/v2/models/no-such-model")
    assert response.status_code == 404
    assert set(response.json()) == {"error"}
