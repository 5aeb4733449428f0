// The slot page's "Try it" panel (templates/slots/_try.html): posts to
// /slots/<name>/try/<endpoint> with the session and its CSRF token, and shows the answer.
// The CSP allows no inline script, hence this file; nothing here builds HTML from strings.
(function () {
  "use strict";

  function el(tag, text, cls) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = text;
    if (cls) node.className = cls;
    return node;
  }
  function csrf(form) {
    var input = form.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }
  function post(form, body, isForm) {
    var headers = { "X-CSRFToken": csrf(form) };
    if (!isForm) headers["Content-Type"] = "application/json";
    return fetch(form.action, {
      method: "POST", credentials: "same-origin", headers: headers,
      body: isForm ? body : JSON.stringify(body)
    });
  }
  // the gateway's OpenAI-shaped error, or what the status says
  function failure(response) {
    return response.text().then(function (text) {
      var message = "";
      try { message = JSON.parse(text).error.message; } catch (e) { message = ""; }
      throw new Error(message || ("hal0 answered " + response.status + "."));
    });
  }
  function ok(response) { return response.ok ? response : failure(response); }
  function field(form, name) { return form.elements[name] ? form.elements[name].value : ""; }

  function chat(form, out, stats) {
    var started = performance.now(), first = null, pieces = 0, usage = null;
    var answer = el("p", "", "try-answer");
    out.appendChild(answer);
    return post(form, {
      messages: [{ role: "user", content: field(form, "prompt") }],
      stream: true, stream_options: { include_usage: true }
    }).then(ok).then(function (response) {
      var reader = response.body.getReader(), decoder = new TextDecoder(), buffer = "";
      function lines(text) {
        buffer += text;
        var parts = buffer.split("\n");
        buffer = parts.pop();
        parts.forEach(function (line) {
          if (line.indexOf("data:") !== 0) return;
          var data = line.slice(5).trim();
          if (!data || data === "[DONE]") return;
          var chunk;
          try { chunk = JSON.parse(data); } catch (e) { return; }
          if (chunk.error) throw new Error(chunk.error.message || "The stream failed.");
          if (chunk.usage) usage = chunk.usage;
          var choice = chunk.choices && chunk.choices[0];
          var piece = choice && choice.delta && choice.delta.content;
          if (piece) {
            if (first === null) first = performance.now();
            pieces += 1;
            answer.textContent += piece;
          }
        });
      }
      function pump() {
        return reader.read().then(function (step) {
          if (step.done) return;
          lines(decoder.decode(step.value, { stream: true }));
          return pump();
        });
      }
      return pump();
    }).then(function () {
      var end = performance.now();
      var tokens = usage && usage.completion_tokens ? usage.completion_tokens : pieces;
      var ttft = first === null ? null : first - started;
      var rate = first !== null && end > first ? tokens * 1000 / (end - first) : null;
      stats.textContent = "TTFT " + (ttft === null ? "—" : Math.round(ttft) + " ms") +
        " · " + (rate === null ? "—" : rate.toFixed(1) + " tok/s") + " · " + tokens + " tokens";
    });
  }

  function cosine(a, b) {
    var dot = 0, na = 0, nb = 0;
    for (var i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
    return na && nb ? dot / Math.sqrt(na * nb) : 0;
  }
  function embed(form, out) {
    return post(form, { input: [field(form, "a"), field(form, "b")] }).then(ok)
      .then(function (r) { return r.json(); }).then(function (data) {
        var a = data.data[0].embedding, b = data.data[1].embedding;
        var list = el("dl", null, "stats");
        [["dimensions", String(a.length)], ["cosine similarity", cosine(a, b).toFixed(4)]]
          .forEach(function (pair) {
            var div = el("div");
            div.appendChild(el("dt", pair[0]));
            div.appendChild(el("dd", pair[1], pair[0] === "cosine similarity" ? "try-similarity" : ""));
            list.appendChild(div);
          });
        out.appendChild(list);
      });
  }

  function rerank(form, out) {
    var docs = field(form, "documents").split("\n").map(function (s) { return s.trim(); })
      .filter(function (s) { return s; });
    return post(form, { query: field(form, "query"), documents: docs }).then(ok)
      .then(function (r) { return r.json(); }).then(function (data) {
        var ranked = (data.results || []).slice().sort(function (x, y) {
          return y.relevance_score - x.relevance_score;
        });
        var list = el("ol", null, "try-ranked");
        ranked.forEach(function (item) {
          var li = el("li", docs[item.index]);
          li.appendChild(el("span", " (" + Number(item.relevance_score).toFixed(3) + ")", "muted"));
          list.appendChild(li);
        });
        out.appendChild(list);
      });
  }

  function stt(form, out) {
    var body = new FormData();
    body.append("file", form.elements.file.files[0]);
    return post(form, body, true).then(ok).then(function (r) { return r.json(); })
      .then(function (data) { out.appendChild(el("p", data.text, "try-answer")); });
  }

  function tts(form, out) {
    return post(form, { input: field(form, "input"), response_format: "wav" }).then(ok)
      .then(function (r) { return r.blob(); }).then(function (blob) {
        var audio = el("audio", null, "try-audio");
        audio.controls = true;
        audio.src = URL.createObjectURL(blob);
        out.appendChild(audio);
      });
  }

  function img(form, out) {
    return post(form, { prompt: field(form, "prompt"), size: "256x256",
                        response_format: "b64_json" }).then(ok)
      .then(function (r) { return r.json(); }).then(function (data) {
        var image = el("img", null, "try-image");
        image.alt = "Generated for: " + field(form, "prompt");
        image.src = "data:image/png;base64," + data.data[0].b64_json;
        out.appendChild(image);
      });
  }

  var PANELS = { chat: chat, embed: embed, rerank: rerank, stt: stt, tts: tts, img: img };

  document.addEventListener("submit", function (event) {
    var form = event.target.closest && event.target.closest("form.try-form");
    if (!form) return;
    event.preventDefault();
    var panel = form.closest(".try");
    var out = panel.querySelector(".try-result"), stats = panel.querySelector(".try-stats");
    var button = form.querySelector("button[type=submit]");
    out.replaceChildren();
    stats.textContent = "";
    out.setAttribute("aria-busy", "true");
    button.disabled = true;
    var run = PANELS[form.getAttribute("data-try")];
    Promise.resolve().then(function () { return run(form, out, stats); })
      .catch(function (error) {
        out.appendChild(el("p", error.message || String(error), "try-error error"));
      })
      .then(function () {
        out.removeAttribute("aria-busy");
        button.disabled = false;
      });
  });
})();
