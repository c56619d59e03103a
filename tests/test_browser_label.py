"""The labelling loop in the Prefect UI that ``finetune-flows up`` serves, driven in headless Chromium (Selenium).

A finance champion is trained first through ``finance-finetune`` (pointed at a tiny BERT and 400
Financial PhraseBank sentences, as an operator would with *Edit*). Then ``finance-label`` runs and
pauses; in the browser a person opens the paused run, presses *Resume*, labels three texts in the
form and submits. The labels land in the data folder, the run raises ``finetune-flows.data.new-labels``,
and the trigger that ``up`` deployed with ``finance-retrain`` starts exactly one retrain run, which
trains on the data folder (the new labels file among its files) and records its promotion decision;
its page names the automation that started it and shows the decision among its artifacts.
Screenshots go to ``tests/output/browser/``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.conftest import CHROMIUM
from tests.test_browser import record, screenshot

ROOT = Path(__file__).resolve().parents[1]
PHRASEBANK = ROOT / "plugins" / "scenarios" / "data" / "financial_phrasebank" / "Sentences_50Agree.txt"
LABELLER = "browser-tester"
CHOICES = ["negative", "positive", "neutral"]
PROPERTY = "ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property ')][1]"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs /usr/bin/chromium (bash .ci/setup installs it)"),
]


def phrasebank(start: int, stop: int) -> pd.DataFrame:
    lines = PHRASEBANK.read_text(encoding="latin-1").splitlines()[start:stop]
    pairs = [line.rpartition("@") for line in lines]
    return pd.DataFrame({"text": [p[0].strip() for p in pairs], "label": [p[2].strip() for p in pairs]})


@pytest.fixture(scope="module")
def loop(services: dict[str, str], tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny finance champion trained through finance-finetune; finance-label and finance-retrain pointed at a
    data folder, a frozen eval file and a pool of unlabelled texts. Returns the URL and the paths."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    folder = tmp_path_factory.mktemp("label-loop")
    train, frozen, pool = phrasebank(0, 400), phrasebank(400, 460), phrasebank(460, 500)  # parity gates: >= 256
    train.to_csv(folder / "train.csv", index=False)
    frozen.to_csv(folder / "eval.csv", index=False)
    pool[["text"]].to_csv(folder / "pool.csv", index=False)
    data = folder / "retrain"
    data.mkdir()
    train.to_csv(data / "base.csv", index=False)  # the team's labelled data; new label files join it
    model = {"source": str(tiny_model_dir), "max_length": 32}
    training = {"epochs": 1.0, "batch_size": 16, "learning_rate": 5e-3, "eval_every_steps": 5}
    url = record(services).prefect_url
    with SyncPrefectClient(f"{url}/api") as client:
        for name, config in {
            "finetune/finance-finetune": {"scenario": "finance-monitoring", "model": model, "training": training,
                                          "data": {"train_path": str(folder / "train.csv"), "test_fraction": 0.0}},
            "retrain/finance-retrain": {"scenario": "finance-monitoring", "model": model, "training": training,
                                        "data_folder": str(data), "data": {"eval_path": str(folder / "eval.csv")},
                                        "infrastructure": {"train_on": "train/finance-train"}},
            "label/finance-label": {"model_name": "finance-monitoring", "data_folder": str(data),
                                    "source": str(folder / "pool.csv"), "eval_path": str(folder / "eval.csv"),
                                    "texts": 3, "batch_size": 3, "retrain_after": 3},
        }.items():  # fmt: skip
            client.update_deployment(
                client.read_deployment_by_name(name).id, DeploymentUpdate(parameters={"config": config})
            )
    with temporary_settings(updates={PREFECT_API_URL: f"{url}/api"}):
        champion = run_deployment("finetune/finance-finetune", timeout=900, poll_interval=2)
    assert champion.state_name == "Completed", champion.state
    return {"url": url, "mlflow": record(services).mlflow_url, "data": data}


def flow_runs(url: str, deployment: str) -> list[Any]:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with SyncPrefectClient(f"{url}/api") as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def wait_state(url: str, run_id: Any, states: set[str], seconds: float) -> str:
    from prefect.client.orchestration import SyncPrefectClient

    deadline = time.monotonic() + seconds
    with SyncPrefectClient(f"{url}/api") as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(run_id).state_name or ""
            if state in states:
                return state
            time.sleep(1)
    raise AssertionError(f"flow run {run_id} not in {states} after {seconds} s")


def label_in_the_form(driver: Any, url: str, run_id: Any) -> list[str]:
    """The paused run's page > Resume > labelled by + a label per text > Submit; the texts as the form titles them
    (a long one cut)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(driver, 60)
    driver.get(f"{url}/runs/flow-run/{run_id}")
    wait.until(ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Resume']"))).click()
    wait.until(ec.presence_of_element_located((By.XPATH, "//*[normalize-space()='Label batch 1 of 1']")))
    labelled_by = driver.find_element(By.XPATH, f"//span[normalize-space()='Labelled by']/{PROPERTY}//textarea")
    labelled_by.send_keys(LABELLER)
    titles = []
    for number, choice in enumerate(CHOICES, start=1):
        label = f"//span[starts-with(normalize-space(), '{number}. ')]"
        title = driver.find_element(By.XPATH, label).text.removeprefix(f"{number}. ").removesuffix(" (Optional)")
        titles.append(title.removesuffix("..."))  # a long text is cut in the title
        select = driver.find_element(By.XPATH, f"{label}/{PROPERTY}//select")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", select)
        Select(select).select_by_value(choice)
    screenshot(driver, "6-prefect-label-form")
    submit = driver.find_element(By.XPATH, "//button[normalize-space()='Submit']")
    driver.execute_script("arguments[0].click()", submit)
    return titles


def check_decision_in_the_ui(driver: Any, url: str, run_id: Any) -> str:
    """The retrain run's page: started by the trigger's automation; Artifacts > the retrain's markdown: the
    promotion decision (its text)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/runs/flow-run/{run_id}")
    badge = "//header[contains(@class, 'page-heading-flow-run')]//span[contains(@class, 'state-badge')]"
    WebDriverWait(driver, 60, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: any(e.text == "Completed" for e in d.find_elements(By.XPATH, badge))
    )
    # The run's heading names the automation that started it.
    driver.find_element(By.XPATH, "//a[normalize-space()='finance-retrain on new data']")
    screenshot(driver, "7-prefect-retrain-run")
    tab, card = "//*[normalize-space()='Artifacts']", "//*[normalize-space()='finance-monitoring-retrain']"
    WebDriverWait(driver, 60).until(ec.element_to_be_clickable((By.XPATH, tab))).click()
    WebDriverWait(driver, 60).until(ec.element_to_be_clickable((By.XPATH, card))).click()
    decision = WebDriverWait(driver, 60).until(
        ec.presence_of_element_located((By.XPATH, "//*[starts-with(normalize-space(), 'decision: ')]"))
    )
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", decision)
    screenshot(driver, "8-prefect-retrain-decision")
    return str(decision.text)


def test_labels_given_in_the_prefect_ui_start_a_retrain_that_trains_on_them(browser: Any, loop: dict[str, Any]) -> None:
    import mlflow
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, data = loop["url"], loop["data"]
    with temporary_settings(updates={PREFECT_API_URL: f"{url}/api"}):
        labelling = run_deployment("label/finance-label", timeout=0)
    wait_state(url, labelling.id, {"Paused"}, 300)
    try:
        titles = label_in_the_form(browser, url, labelling.id)
    except Exception:
        screenshot(browser, "error-label-form")
        raise
    assert wait_state(url, labelling.id, {"Completed", "Failed", "Crashed"}, 300) == "Completed"
    (labels_file,) = data.glob("labels-*.csv")
    saved = pd.read_csv(labels_file)
    assert saved["label"].tolist() == CHOICES and set(saved["labelled_by"]) == {LABELLER}
    assert all(t.startswith(title) for t, title in zip(saved["text"], titles, strict=True))  # what the person saw

    deadline = time.monotonic() + 120
    while not flow_runs(url, "retrain/finance-retrain") and time.monotonic() < deadline:
        time.sleep(1)
    (retrain,) = flow_runs(url, "retrain/finance-retrain")  # one run: the trigger, not a schedule or a person
    assert wait_state(url, retrain.id, {"Completed", "Failed", "Crashed"}, 900) == "Completed"
    try:
        decision = check_decision_in_the_ui(browser, url, retrain.id)
    except Exception:
        screenshot(browser, "error-retrain-run")
        raise
    assert labels_file.name in retrain_artifact(url)  # the retrain trained on the new labels
    client = mlflow.MlflowClient(loop["mlflow"])
    versions = client.search_model_versions("name = 'finance-monitoring'")
    assert len(versions) == 2
    champion = client.get_model_version_by_alias("finance-monitoring", "champion").version
    newest = max(int(v.version) for v in versions)
    assert decision.startswith("decision: promoted") == (int(champion) == newest), (decision, champion)


def retrain_artifact(url: str) -> str:
    """The newest finance-monitoring-retrain markdown artifact."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with SyncPrefectClient(f"{url}/api") as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["finance-monitoring-retrain"])),
            sort=ArtifactSort.CREATED_DESC, limit=1,
        )  # fmt: skip
    return str(artifact.data)
