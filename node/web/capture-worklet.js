// The AudioWorklet that hands the microphone's samples to the page, 128 at a time
// (voice.js encodes them).
registerProcessor("chorus-capture", class extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) this.port.postMessage(channel.slice(0));
    return true;
  }
});
