// The drawing pad: pointer events (mouse, finger, pen) draw dark ink on a white canvas; the PNG goes
// to POST /predict, and the answer is shown as a digit with one probability bar per class. Below it,
// "Right" and "Wrong, it was [0-9]" send the true digit of that answer to POST /feedback. POST /explain then
// shows the normalised digit the model saw and, on request, where it looked.
"use strict";

(function () {
  const pad = document.getElementById("pad");
  const ctx = pad.getContext("2d");
  const predictButton = document.getElementById("predict");
  const clearButton = document.getElementById("clear");
  const auto = document.getElementById("auto");
  const digitEl = document.getElementById("digit");
  const confidenceEl = document.getElementById("confidence");
  const barsEl = document.getElementById("bars");
  const statusEl = document.getElementById("status");
  const modelEl = document.getElementById("model");
  const feedbackEl = document.getElementById("feedback");
  const rightButton = document.getElementById("right");
  const labelsEl = document.getElementById("labels");
  const feedbackStatusEl = document.getElementById("feedback-status");
  const whyEl = document.getElementById("why");
  const seenImg = document.getElementById("seen");
  const showWhy = document.getElementById("show-why");

  // about the stroke width of MNIST digits once the drawing is scaled into a 20x20 box
  const STROKE = Math.round(pad.width / 14);
  let drawing = false;
  let hasInk = false;
  let last = null;
  let pending = null; // the request in flight
  let again = false; // the drawing changed while a request was in flight
  let shownVersion = null; // the model version in the header
  let answered = null; // the answer on show: {request_id, digit}
  let explained = null; // its pictures from POST /explain: {seen, overlay}, base64 PNGs

  // ------------------------------------------------------------ the pad

  function clearPad() {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, pad.width, pad.height);
    hasInk = false;
  }

  function point(event) {
    const rect = pad.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) * pad.width) / rect.width,
      y: ((event.clientY - rect.top) * pad.height) / rect.height,
    };
  }

  function stroke(from, to) {
    ctx.strokeStyle = "#000";
    ctx.lineWidth = STROKE;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
    hasInk = true;
  }

  pad.addEventListener("pointerdown", (event) => {
    if (event.button !== undefined && event.button > 0) return; // left button, touch or pen only
    event.preventDefault();
    pad.setPointerCapture?.(event.pointerId);
    drawing = true;
    last = point(event);
    stroke(last, last); // a tap leaves a dot
  });

  pad.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    event.preventDefault();
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    for (const e of events.length ? events : [event]) {
      const next = point(e);
      stroke(last, next);
      last = next;
    }
  });

  function endStroke(event) {
    if (!drawing) return;
    drawing = false;
    last = null;
    pad.releasePointerCapture?.(event.pointerId);
    if (auto.checked) predict();
  }
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);

  // ------------------------------------------------------------ the answer

  function buildBars() {
    barsEl.innerHTML = "";
    for (let d = 0; d < 10; d++) {
      const li = document.createElement("li");
      li.className = "bar";
      li.dataset.digit = String(d);
      li.innerHTML =
        `<span class="label">${d}</span>` +
        `<span class="track"><span class="fill"></span></span>` +
        `<span class="value">–</span>`;
      barsEl.appendChild(li);
    }
  }

  // the two most probable digits, most probable first
  function topTwo(probabilities) {
    const order = probabilities.map((p, d) => [p, d]).sort((a, b) => b[0] - a[0]);
    return order.slice(0, 2).map(([p, d]) => ({ digit: d, probability: p }));
  }

  function showAnswer(answer) {
    const percent = (p) => `${(p * 100).toFixed(1)}%`;
    const [first, second] = topTwo(answer.probabilities);
    digitEl.textContent = String(answer.digit);
    // an unsure answer is a guess between two digits, and says so: its confidence is too low to act on
    digitEl.dataset.state = answer.unsure ? "unsure" : "answered";
    confidenceEl.textContent = answer.unsure
      ? `not sure: ${first.digit} (${percent(first.probability)}) or ${second.digit} (${percent(second.probability)})`
      : `${percent(answer.confidence)} sure`;
    confidenceEl.classList.toggle("unsure", Boolean(answer.unsure));
    answer.probabilities.forEach((p, d) => {
      const li = barsEl.children[d];
      li.classList.toggle("top", d === answer.digit);
      li.classList.toggle("second", Boolean(answer.unsure) && d === second.digit);
      li.querySelector(".fill").style.width = `${(p * 100).toFixed(1)}%`;
      li.querySelector(".value").textContent = `${(p * 100).toFixed(1)}%`;
      li.dataset.probability = String(p);
    });
    setStatus(`answered by ${answer.model_name} v${answer.model_version} (run ${(answer.run_id || "?").slice(0, 8)})`);
    if (answer.model_version !== shownVersion) loadModelInfo(); // the champion moved: refresh the header
    offerFeedback(answer);
  }

  // ------------------------------------------------------------ corrections

  function buildLabels() {
    for (let d = 0; d < 10; d++) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "secondary label-button";
      button.textContent = String(d);
      button.dataset.label = String(d);
      button.setAttribute("aria-label", `wrong, it was ${d}`);
      button.addEventListener("click", () => sendFeedback(d));
      labelsEl.appendChild(button);
    }
  }

  function setFeedbackButtons(enabled) {
    rightButton.disabled = !enabled;
    for (const button of labelsEl.children) {
      button.disabled = !enabled || (answered && Number(button.dataset.label) === answered.digit);
    }
  }

  function offerFeedback(answer) {
    answered = { request_id: answer.request_id, digit: answer.digit };
    feedbackEl.hidden = !answer.request_id;
    feedbackStatusEl.textContent = "";
    feedbackStatusEl.classList.remove("error");
    setFeedbackButtons(true);
  }

  function hideFeedback() {
    answered = null;
    feedbackEl.hidden = true;
  }

  async function sendFeedback(label) {
    if (!answered) return;
    const sent = answered;
    setFeedbackButtons(false);
    try {
      const response = await post("feedback", {
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ request_id: sent.request_id, label }),
      });
      if (!response.ok) {
        feedbackStatusEl.textContent = `not recorded: ${await errorText(response)}`;
        feedbackStatusEl.classList.add("error");
        return;
      }
      const recorded = await response.json();
      feedbackStatusEl.classList.remove("error");
      feedbackStatusEl.textContent =
        (recorded.correct
          ? `Thank you: recorded that ${recorded.label} was right.`
          : `Thank you: recorded that it was ${recorded.label}, not ${recorded.digit}.`) +
        (recorded.status === "quarantined" ? " A person will review it before it counts." : "");
    } catch (err) {
      feedbackStatusEl.textContent = `not recorded: the service did not answer (${err})`;
      feedbackStatusEl.classList.add("error");
      setFeedbackButtons(answered === sent);
    }
  }

  rightButton.addEventListener("click", () => answered && sendFeedback(answered.digit));

  function showExplanation() {
    whyEl.hidden = !explained;
    if (!explained) return;
    seenImg.src = `data:image/png;base64,${showWhy.checked ? explained.overlay : explained.seen}`;
    seenImg.alt = showWhy.checked
      ? "where the model looked, as a heat map over the digit it saw"
      : "the normalised 28x28 digit the model saw";
  }

  showWhy.addEventListener("change", showExplanation);

  async function explain(png, requestId) {
    const form = new FormData();
    form.append("image", png, "drawing.png");
    try {
      const response = await post("explain", { body: form });
      if (!response.ok || !answered || answered.request_id !== requestId) return; // a newer answer is on show
      const body = await response.json();
      explained = { seen: body.seen_png, overlay: body.overlay_png };
      showExplanation();
    } catch (_) {
      // the answer stands without its pictures
    }
  }

  function resetAnswer() {
    hideFeedback();
    explained = null;
    showExplanation();
    digitEl.textContent = "?";
    digitEl.dataset.state = "empty";
    confidenceEl.textContent = "";
    confidenceEl.classList.remove("unsure");
    for (const li of barsEl.children) {
      li.classList.remove("top", "second");
      li.querySelector(".fill").style.width = "0";
      li.querySelector(".value").textContent = "–";
      delete li.dataset.probability;
    }
  }

  function setStatus(text, isError = false) {
    statusEl.textContent = text;
    statusEl.classList.toggle("error", isError);
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      const item = Array.isArray(body) ? body[0] : body;
      return (item && item.error) || JSON.stringify(body);
    } catch (_) {
      return `${response.status} ${response.statusText}`;
    }
  }

  // ------------------------------------------------------------ talking to the service

  // A service started with DIGITS_API_KEY answers POSTs only with its key: the page asks for it once,
  // and keeps it for this tab only.
  const KEY_ITEM = "digits-api-key";

  async function post(url, options) {
    const send = () => {
      const key = sessionStorage.getItem(KEY_ITEM);
      const headers = { ...(options.headers || {}), ...(key ? { "X-API-Key": key } : {}) };
      return fetch(url, { ...options, method: "POST", headers });
    };
    let response = await send();
    if (response.status === 401) {
      const key = window.prompt("This service needs its API key (DIGITS_API_KEY) to answer:");
      if (key && key.trim()) {
        sessionStorage.setItem(KEY_ITEM, key.trim());
        response = await send();
      }
    }
    return response;
  }

  function pngOfPad() {
    return new Promise((resolve) => pad.toBlob(resolve, "image/png"));
  }

  async function predict() {
    if (!hasInk) {
      setStatus("Draw a digit first.", true);
      return;
    }
    if (pending) {
      again = true; // predict once more with the latest drawing when this answer is in
      return;
    }
    predictButton.disabled = true;
    setStatus("predicting…");
    pending = (async () => {
      try {
        const form = new FormData();
        const png = await pngOfPad();
        form.append("image", png, "drawing.png");
        // the header marks the answer as a drawing in the prediction log
        const response = await post("predict", { body: form, headers: { "X-Digits-Source": "draw" } });
        if (!response.ok) {
          resetAnswer();
          setStatus(`${response.status}: ${await errorText(response)}`, true);
          return;
        }
        const answer = await response.json();
        showAnswer(answer);
        explain(png, answer.request_id); // not awaited: the answer is on show already
      } catch (err) {
        setStatus(`the service did not answer: ${err}`, true);
      } finally {
        pending = null;
        predictButton.disabled = false;
        if (again) {
          again = false;
          predict();
        }
      }
    })();
  }

  async function loadModelInfo() {
    try {
      const response = await fetch("model");
      if (!response.ok) {
        modelEl.textContent = await errorText(response);
        modelEl.classList.add("error");
        return;
      }
      const info = await response.json();
      shownVersion = info.model_version;
      modelEl.classList.remove("error");
      const accuracy = info.metrics && info.metrics.test_accuracy;
      modelEl.textContent =
        `model ${info.model_name} v${info.model_version}` +
        (accuracy !== undefined ? ` · test accuracy ${(accuracy * 100).toFixed(2)}%` : "") +
        (info.promoted_at ? ` · promoted ${info.promoted_at}` : "");
    } catch (err) {
      modelEl.textContent = `the service did not answer: ${err}`;
    }
  }

  predictButton.addEventListener("click", predict);
  clearButton.addEventListener("click", () => {
    clearPad();
    resetAnswer();
    setStatus("Draw one digit, large and centred, then press Predict.");
  });

  clearPad();
  buildBars();
  buildLabels();
  loadModelInfo();
})();
