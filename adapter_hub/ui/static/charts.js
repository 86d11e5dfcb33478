// Draws each element's plotly figure from its data-figure attribute (JSON written by the server).
document.addEventListener("DOMContentLoaded", function () {
  if (typeof Plotly === "undefined") return;
  document.querySelectorAll("[data-figure]").forEach(function (el) {
    var fig = JSON.parse(el.getAttribute("data-figure"));
    Plotly.newPlot(el, fig.data, fig.layout, {displaylogo: false, displayModeBar: false, responsive: true}).then(function () {
      el.classList.add("drawn");
    });
  });
});
