// The teacher's scoring page. Plain browser JavaScript, no build step, nothing loaded from elsewhere.
// Everything a person typed or the server echoed (sentences, file names, error messages) is put
// into the page with textContent, never as markup: a sentence "<img onerror=...>" shows literally.
"use strict";

(() => {
  const byId = (id) => document.getElementById(id);
  const form = byId("score-form");
  const dropZone = byId("drop-zone");
  const imageInput = byId("image-input");
  const preview = byId("preview");
  const button = byId("score-button");
  let imageFile = null;
  let previewUrl = null;

  function setStatus(text, isError = false) {
    const status = byId("status");
    status.textContent = text;
    status.classList.toggle("error", isError);
  }

  function authHeaders() {
    const token = byId("token").value.trim();
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  function useFile(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      setStatus(`${file.name} is not an image (${file.type}).`, true);
      return;
    }
    imageFile = file;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.src = previewUrl;
    preview.hidden = false;
    byId("drop-label").textContent = `${file.name || "image"} (${file.size.toLocaleString()} bytes)`;
    setStatus("");
  }

  function lines() {
    return byId("lines").value.split(/\r?\n/).map((line) => line.trim()).filter((line) => line.length > 0);
  }

  async function showModelInfo() {
    const info = byId("model-info");
    try {
      const response = await fetch("v1/model", { headers: authHeaders() });
      if (response.status === 401) {
        info.textContent = "This server needs an access token: open “Access token” below.";
        byId("token-box").open = true;
        return;
      }
      const model = await response.json();
      info.textContent = `${model.model_id} · fingerprint ${model.fingerprint} · ${model.dtype} · ` +
        `ITM start token ${model.itm_start_token}${model.ready ? "" : " · not ready"}`;
    } catch (error) {
      info.textContent = `Model information unavailable (${error.message}).`;
    }
  }

  function resultRow(row) {
    const item = document.createElement("li");
    item.className = row.cached ? "row cached" : "row fresh";
    item.title = `match logit margin ${row.match_logit.toFixed(4)}; request position ${row.index + 1}`;

    const label = document.createElement("span");
    label.className = "label";
    label.textContent = row.sentence;

    const track = document.createElement("span");
    track.className = "track";
    const bar = document.createElement("span");
    bar.className = "bar";
    // Set through the CSSOM (allowed by the page's Content-Security-Policy, unlike style="...").
    bar.style.width = `${(Math.min(1, Math.max(0, row.match_prob)) * 100).toFixed(2)}%`;
    track.append(bar);

    const value = document.createElement("span");
    value.className = "value";
    value.textContent = row.match_prob.toFixed(3);

    const origin = document.createElement("span");
    origin.className = "origin";
    origin.textContent = row.cached ? "cached" : "new";

    item.append(label, track, value, origin);
    return item;
  }

  function showResults(data) {
    byId("results").replaceChildren(...data.scores.map(resultRow));
    const cached = data.scores.filter((row) => row.cached).length;
    byId("summary").textContent = `${data.scores.length} scored, ${cached} from the cache · image SHA-256 ` +
      `${data.image.digest.slice(0, 16)}… · model ${data.model.fingerprint}`;
  }

  async function score(event) {
    event.preventDefault();
    if (!imageFile) {
      setStatus("Pick or drop an image first.", true);
      return;
    }
    const texts = lines();
    if (texts.length === 0) {
      setStatus("Type at least one line to score.", true);
      return;
    }
    const mode = form.querySelector('input[name="mode"]:checked').value;
    const body = new FormData();
    body.append("image", imageFile, imageFile.name || "image");
    for (const text of texts) body.append(mode, text); // field "triplets" or "sentences"
    const url = mode === "triplets" ? "v1/score/triplets?sort=desc" : "v1/score?sort=desc";

    button.disabled = true;
    setStatus(`Scoring ${texts.length} line(s)…`);
    try {
      const response = await fetch(url, { method: "POST", body, headers: authHeaders() });
      const data = await response.json().catch(() => null);
      if (!response.ok) {
        const message = data && data.error ? data.error.message : response.statusText;
        setStatus(`Error ${response.status}: ${message}`, true);
        return;
      }
      showResults(data);
      setStatus("Done.");
    } catch (error) {
      setStatus(`The request failed: ${error.message}`, true);
    } finally {
      button.disabled = false;
    }
  }

  imageInput.addEventListener("change", () => useFile(imageInput.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    dropZone.addEventListener(name, (event) => {
      event.preventDefault();
      dropZone.classList.add("dragging");
    });
  }
  dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropZone.classList.remove("dragging");
    useFile(event.dataTransfer && event.dataTransfer.files[0]);
  });
  form.addEventListener("submit", score);
  byId("token").addEventListener("change", showModelInfo);
  showModelInfo();
})();
