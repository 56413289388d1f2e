// locpath's deep-zoom viewer: the selected slide's Deep Zoom tiles in OpenSeadragon (vendored, static/vendor/), the
// last answer's evidence as a heatmap with an opacity control, the tissue grid on demand, and the top evidence tiles
// listed (a click pans and zooms to the tile). Every request carries the API key in a header, as app.js's do:
// tiles through OpenSeadragon's AJAX loading, overlays fetched here and shown as blobs; never a key in a URL.
// Uses app.js's `$`, `api` and `headers`; app.js calls LocpathViewer.open(slide) and LocpathViewer.evidence(job, ev).
"use strict";
const LocpathViewer = (() => {
  let osd = null;
  let slide = null;  // the slide shown
  let heat = null;  // the heatmap's TiledImage and its object URL
  let heatURL = null;
  let heatSeq = 0;  // only the latest answer's heatmap is added
  let grid = null;  // the tissue grid's overlay element, fetched on first use
  let mark = null;  // the outline of the evidence tile last gone to

  function create() {
    osd = OpenSeadragon({
      id: "osd",
      prefixUrl: "/static/vendor/openseadragon/images/",
      loadTilesWithAjax: true,
      ajaxHeaders: headers(),
      tileRetryMax: 3,  // a busy service answers 429 (Retry-After: 1) when too many tile renders wait
      tileRetryDelay: 1000,
      showNavigator: false,  // its tile requests would not carry the key (OpenSeadragon issue 2502)
      showRotationControl: false,
      maxZoomPixelRatio: 2,
      visibilityRatio: 0.5,
      gestureSettingsMouse: { clickToZoom: false },
    });
    osd.addHandler("open", () => { $("osd").dataset.state = "open"; $("viewer-status").textContent = ""; });
    osd.addHandler("open-failed", (e) => {
      $("osd").dataset.state = "failed";
      $("viewer-status").textContent = "the slide's tiles could not be opened: " + (e.message || "");
    });
  }

  function slideImage() { return osd.world.getItemAt(0); }

  function open(s) {
    $("viewer-panel").hidden = false;
    if (!osd) create();
    if (slide && slide.id === s.id) return;
    slide = s;
    clearOverlays();
    $("evidence-list").replaceChildren();
    $("osd").dataset.state = "opening";
    osd.setAjaxHeaders(headers(), true);
    osd.open("/v1/slides/" + s.id + "/viewer.dzi");
  }

  function clearOverlays() {
    if (heatURL) URL.revokeObjectURL(heatURL);
    heat = heatURL = grid = mark = null;
    heatSeq++;
    delete $("osd").dataset.heatmap;
    $("grid-toggle").checked = false;
    if (osd) osd.clearOverlays();
  }

  async function evidence(job, ev) {  // a finished answer: its heatmap over the slide, its top tiles listed
    if (!osd || !slide || !ev || ev.tile_size_level0 == null) return;
    listTiles(ev);
    const seq = ++heatSeq;
    const url = await imageURL("/v1/slides/" + slide.id + "/viewer/heatmap.png?evidence=" + encodeURIComponent(job));
    if (seq !== heatSeq) { URL.revokeObjectURL(url); return; }
    if (heat) osd.world.removeItem(heat);
    if (heatURL) URL.revokeObjectURL(heatURL);
    heatURL = url;
    osd.addSimpleImage({
      url: url, x: 0, y: 0, width: 1, opacity: Number($("heat-opacity").value),
      success: (e) => { heat = e.item; $("osd").dataset.heatmap = job; },
    });
  }

  function listTiles(ev) {
    $("evidence-list").replaceChildren(...ev.top.map((t, i) => {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = "(" + t.x + ", " + t.y + ") " + (100 * t.weight).toFixed(1) + " %";
      b.title = "go to this tile (level-0 pixels; its share of the evidence)";
      Object.assign(li.dataset, { x: t.x, y: t.y, size: ev.tile_size_level0, rank: i + 1 });
      b.onclick = () => goTo(t.x, t.y, ev.tile_size_level0);
      li.append(b);
      return li;
    }));
  }

  function goTo(x, y, size) {  // the tile, in level-0 pixels, with half a tile around it, and outlined
    const img = slideImage();
    if (!img) return;
    osd.viewport.fitBounds(img.imageToViewportRectangle(x - size / 2, y - size / 2, 2 * size, 2 * size));
    const at = img.imageToViewportRectangle(x, y, size, size);
    if (mark) osd.updateOverlay(mark, at);
    else {
      mark = document.createElement("div");
      mark.className = "evidence-mark";
      osd.addOverlay({ element: mark, location: at });
    }
  }

  async function toggleGrid(on) {
    if (!osd || !slide) return;
    if (on && !grid) {
      const id = slide.id;
      const g = await (await api("/v1/slides/" + id + "/viewer/grid.json")).json();
      if (!slide || slide.id !== id || grid) return;
      grid = gridElement(g);
      osd.addOverlay({ element: grid, location: slideImage().imageToViewportRectangle(0, 0, g.width, g.height) });
    }
    if (grid) grid.style.display = on ? "" : "none";
    $("osd").dataset.grid = on ? "shown" : "hidden";
  }

  function gridElement(g) {  // one SVG path of every planned tile, drawn 1 px wide at every zoom
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 " + g.width + " " + g.height);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.classList.add("tissue-grid");
    const path = document.createElementNS(ns, "path");
    const s = g.tile_size_level0;
    path.setAttribute("d", g.tiles.map(([x, y]) => "M" + x + " " + y + "h" + s + "v" + s + "h" + -s + "z").join(""));
    path.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(path);
    return svg;
  }

  $("heat-opacity").oninput = () => { if (heat) heat.setOpacity(Number($("heat-opacity").value)); };
  $("grid-toggle").onchange = () => {
    toggleGrid($("grid-toggle").checked).catch((e) => { $("viewer-status").textContent = e.message; });
  };
  $("apikey").addEventListener("change", () => {  // the new key for the tiles: open the slide again with it
    if (osd && slide) { const s = slide; slide = null; open(s); }
  });
  return { open, evidence, goTo, get viewer() { return osd; } };
})();
