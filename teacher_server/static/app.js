// The teacher's scoring page. Plain browser JavaScript, no build step, nothing loaded from elsewhere.
// Everything a person typed or the server echoed (sentences, file names, error messages) is put
// into the page with textContent, never as markup: a sentence "<img onerror=...>" shows literally.
// A person may draw two boxes on the image (the human, then the object): the scores are then for
// that pair, and the boxes go to the API in pixels of the original image (the `region` field).
// After scoring, clicking a sentence asks `v1/explain` for its evidence map (a PNG of the image with
// the teacher's Grad-CAM drawn in) and lays it over the image; a button toggles back to the plain image.
"use strict";

(() => {
  const byId = (id) => document.getElementById(id);
  const form = byId("score-form");
  const dropZone = byId("drop-zone");
  const imageInput = byId("image-input");
  const preview = byId("preview");
  const button = byId("score-button");
  const stage = byId("stage");
  const BOX_KINDS = ["human", "object"];
  const MIN_BOX_PX = 3; // a drag shorter than this (on screen) is a click, not a box
  let imageFile = null;
  let previewUrl = null;
  let boxes = []; // drawn boxes, [x1, y1, x2, y2] in pixels of the original image: human, then object
  let drawing = null; // the drag in progress: {start: [x, y], end: [x, y]} in original pixels
  let scored = null; // what the shown results were scored on: {file, region}, for their evidence maps
  let evidenceUrl = null;
  const evidence = byId("evidence");
  const toggleEvidence = byId("toggle-evidence");

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
    scored = null; // the results on show were for another image: no maps for them
    hideEvidence();
    byId("evidence-tools").hidden = true;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    clearBoxes(); // boxes belong to the image they were drawn on
    preview.src = previewUrl;
    stage.hidden = false;
    byId("region-tools").hidden = false;
    byId("drop-label").textContent = `${file.name || "image"} (${file.size.toLocaleString()} bytes)`;
    setStatus("");
  }

  // ------------------------------------------------------------------------------ region boxes
  // Displayed pixels per original pixel, per axis (the preview is scaled to fit the column).
  function scale() {
    const shown = preview.getBoundingClientRect();
    return [shown.width / preview.naturalWidth, shown.height / preview.naturalHeight];
  }

  // A pointer event's position in original pixels, clamped to the image.
  function imagePoint(event) {
    const shown = preview.getBoundingClientRect();
    const [sx, sy] = scale();
    const x = Math.min(Math.max(event.clientX - shown.left, 0), shown.width) / sx;
    const y = Math.min(Math.max(event.clientY - shown.top, 0), shown.height) / sy;
    return [x, y];
  }

  function corners(start, end) {
    return [Math.min(start[0], end[0]), Math.min(start[1], end[1]), Math.max(start[0], end[0]), Math.max(start[1], end[1])];
  }

  const roundedBox = (box) => box.map((value) => Math.round(value * 10) / 10);
  const boxText = (box) => `[${box.map((value) => Math.round(value)).join(", ")}]`;

  function placeBox(element, box) {
    element.hidden = !box;
    if (!box) return;
    const [sx, sy] = scale();
    // Through the CSSOM: the page's Content-Security-Policy refuses style="..." attributes.
    element.style.left = `${box[0] * sx}px`;
    element.style.top = `${box[1] * sy}px`;
    element.style.width = `${(box[2] - box[0]) * sx}px`;
    element.style.height = `${(box[3] - box[1]) * sy}px`;
  }

  function showBoxes() {
    const shown = drawing ? [...boxes, corners(drawing.start, drawing.end)] : boxes;
    BOX_KINDS.forEach((kind, index) => placeBox(byId(`box-${kind}`), shown[index]));
    const state = byId("region-state");
    if (boxes.length === 0) state.textContent = "No boxes: the whole image is scored.";
    else if (boxes.length === 1) state.textContent = `human ${boxText(boxes[0])}; now draw the object box.`;
    else state.textContent = `Pair: human ${boxText(boxes[0])}, object ${boxText(boxes[1])} (original pixels).`;
    byId("clear-boxes").disabled = boxes.length === 0;
  }

  function clearBoxes() {
    boxes = [];
    drawing = null;
    showBoxes();
  }

  function region() {
    return boxes.length === 2 ? { human_box: roundedBox(boxes[0]), object_box: roundedBox(boxes[1]) } : null;
  }

  stage.addEventListener("pointerdown", (event) => {
    if (event.button !== 0 || !preview.naturalWidth) return;
    event.preventDefault();
    if (boxes.length === 2) boxes = []; // a third box starts a new pair, with the human
    const point = imagePoint(event);
    drawing = { start: point, end: point };
    stage.setPointerCapture(event.pointerId);
    showBoxes();
  });
  stage.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    drawing.end = imagePoint(event);
    showBoxes();
  });
  function finishBox(event) {
    if (!drawing) return;
    drawing.end = imagePoint(event);
    const box = corners(drawing.start, drawing.end);
    const [sx, sy] = scale();
    drawing = null;
    if ((box[2] - box[0]) * sx >= MIN_BOX_PX && (box[3] - box[1]) * sy >= MIN_BOX_PX) boxes.push(box);
    showBoxes();
  }
  stage.addEventListener("pointerup", finishBox);
  stage.addEventListener("pointercancel", () => {
    drawing = null;
    showBoxes();
  });
  byId("clear-boxes").addEventListener("click", clearBoxes);
  window.addEventListener("resize", showBoxes);
  preview.addEventListener("load", showBoxes);

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
        `ITM start token ${model.itm_start_token} · region policy ${model.region_policy}` +
        `${model.ready ? "" : " · not ready"}`;
    } catch (error) {
      info.textContent = `Model information unavailable (${error.message}).`;
    }
  }

  // ---------------------------------------------------------------------------- evidence maps
  function hideEvidence() {
    evidence.hidden = true;
    evidence.removeAttribute("src");
    if (evidenceUrl) URL.revokeObjectURL(evidenceUrl);
    evidenceUrl = null;
    toggleEvidence.hidden = true;
    for (const row of byId("results").querySelectorAll(".row.explained")) {
      row.classList.remove("explained");
      row.setAttribute("aria-pressed", "false");
    }
  }

  function showEvidence(visible) {
    evidence.hidden = !visible;
    toggleEvidence.textContent = visible ? "Show plain image" : "Show evidence map";
  }

  async function explain(row, item) {
    if (!scored) return;
    if (item.classList.contains("explained") && evidenceUrl) {
      showEvidence(evidence.hidden); // the same sentence again: toggle its map
      return;
    }
    const body = new FormData();
    body.append("image", scored.file, scored.file.name || "image");
    body.append("sentences", row.sentence);
    body.append("format", "png");
    if (scored.region) body.append("region", JSON.stringify(scored.region));
    setStatus(`Mapping the evidence for “${row.sentence}”…`);
    try {
      const response = await fetch("v1/explain", { method: "POST", body, headers: authHeaders() });
      if (!response.ok) {
        const data = await response.json().catch(() => null);
        const message = data && data.error ? data.error.message : response.statusText;
        setStatus(`Evidence map: error ${response.status}: ${message}`, true);
        return;
      }
      const picture = await response.blob();
      hideEvidence();
      evidenceUrl = URL.createObjectURL(picture);
      evidence.src = evidenceUrl;
      item.classList.add("explained");
      item.setAttribute("aria-pressed", "true");
      toggleEvidence.hidden = false;
      showEvidence(true);
      setStatus(`Evidence map of “${row.sentence}” (text layer ${response.headers.get("X-Layer")}; ` +
        `match ${Number(response.headers.get("X-Match-Prob")).toFixed(3)}): red is where the decision looks.`);
    } catch (error) {
      setStatus(`The evidence-map request failed: ${error.message}`, true);
    }
  }

  toggleEvidence.addEventListener("click", () => showEvidence(evidence.hidden));

  function resultRow(row) {
    const item = document.createElement("li");
    item.className = row.cached ? "row cached" : "row fresh";
    item.title = `match logit margin ${row.match_logit.toFixed(4)}; request position ${row.index + 1}; ` +
      "click: evidence map";
    item.tabIndex = 0;
    item.setAttribute("role", "button");
    item.setAttribute("aria-pressed", "false");
    item.addEventListener("click", () => explain(row, item));
    item.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        explain(row, item);
      }
    });

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
    hideEvidence();
    byId("results").replaceChildren(...data.scores.map(resultRow));
    byId("evidence-tools").hidden = false;
    const pair = data.region;
    byId("scope").textContent = pair
      ? `For the pair: human ${boxText(pair.human_box)}, object ${boxText(pair.object_box)} ` +
        `(shown to the model as ${data.model.region_policy})`
      : "For the whole image";
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
    if (boxes.length === 1) {
      setStatus("Draw the object box too, or clear the human box to score the whole image.", true);
      return;
    }
    const pair = region();
    const mode = form.querySelector('input[name="mode"]:checked').value;
    const body = new FormData();
    body.append("image", imageFile, imageFile.name || "image");
    for (const text of texts) body.append(mode, text); // field "triplets" or "sentences"
    if (pair) body.append("region", JSON.stringify(pair)); // the JSON body's object, as form text
    const url = mode === "triplets" ? "v1/score/triplets?sort=desc" : "v1/score?sort=desc";

    button.disabled = true;
    setStatus(`Scoring ${texts.length} line(s)${pair ? " on the pair" : ""}…`);
    try {
      const response = await fetch(url, { method: "POST", body, headers: authHeaders() });
      const data = await response.json().catch(() => null);
      if (!response.ok) {
        const message = data && data.error ? data.error.message : response.statusText;
        setStatus(`Error ${response.status}: ${message}`, true);
        return;
      }
      scored = { file: imageFile, region: pair };
      showResults(data);
      setStatus("Done. Click a sentence for its evidence map.");
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
  showBoxes();
  byId("token").addEventListener("change", showModelInfo);
  showModelInfo();
})();
